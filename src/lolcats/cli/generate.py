"""`lolcats generate`: continue a prompt with a linearized folder (constant-size cache) or a base model."""

from __future__ import annotations

import torch
import typer
from transformers import TextStreamer

from ..artifacts import load_model, tokenizer_for
from .app import app, fail


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    streamer=None,
) -> str:
    """Continue ``prompt``; temperature 0 is greedy. Tokens go to ``streamer`` as they are produced."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    sampling = temperature > 0
    settings = dict(do_sample=sampling, max_new_tokens=max_new_tokens, streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sampling:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        settings.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, **settings)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


@app.command("generate")
def generate_command(
    model: str = typer.Option(..., help="A linearized output folder, or a base model (local folder, hub id, .gguf, 'gemma3-270m') to compare."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Seed for sampling."),
) -> None:
    """Continue PROMPT, streaming tokens as they are produced (constant-size cache for linearized models)."""
    try:
        tokenizer = tokenizer_for(model)
        loaded = load_model(model)
        typer.echo(prompt, nl=False)
        generate_text(loaded, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        fail(err)
