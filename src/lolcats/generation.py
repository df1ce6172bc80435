"""Loading any model lolcats can run (a linearized output folder or a base model) and streaming text."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import MANIFEST, read_manifest
from .models import load_base_model, load_tokenizer


def is_linearized_folder(spec: str) -> bool:
    return (Path(spec).expanduser() / MANIFEST).is_file()


def base_model_spec(spec: str) -> str:
    """The base model of a linearized folder (from its manifest), or ``spec`` itself."""
    return read_manifest(Path(spec))["base_model"]["spec"] if is_linearized_folder(spec) else spec


def load_model(spec: str, dtype: torch.dtype | None = None):
    """A linearized folder through ``lolcats.load``, anything else as a base (teacher) model. ``dtype`` None:
    a linearized folder in the dtype it was trained in (what its numbers were measured in), a base in fp32."""
    if is_linearized_folder(spec):
        from .pipeline import load

        return load(spec, dtype=dtype)
    return load_base_model(spec, dtype=dtype or torch.float32)


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


def tokenizer_for(spec: str):
    return load_tokenizer(base_model_spec(spec))
