"""`lolcats convert`: convert a model and show what changed, before any training."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import typer

from ..config import LinearizeConfig, load_yaml
from ..convert import convert, linearized_layers, trainable_parameters
from ..evaluate.perplexity import next_token_nll, window_batches
from ..models import DEFAULT_MODEL, load_base_model, load_tokenizer
from ..runtime import family_for
from .app import app, fail

SAMPLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she found a shiny red ball under a big tree. She picked it up and ran to show her mom. "
)


def _perplexity(model, ids: torch.Tensor) -> float:
    """Of the one (1, L) sequence ``ids``: every token but the first predicted."""
    total, count = next_token_nll(model, window_batches([(ids[0], 1)], batch_size=1))
    return math.exp(total / count)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def conversion_report(
    model_spec: str,
    config: LinearizeConfig,
    *,
    text: Path | None,
    seq_len: int,
    echo: Callable[[str], None] = print,
) -> dict:
    teacher = load_base_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    family = family_for(teacher.config)
    source = Path(text).read_text() if text else SAMPLE_TEXT * 8
    ids = tokenizer(source, return_tensors="pt").input_ids[:, :seq_len]
    if ids.shape[1] < 2:
        raise ValueError("the check text is shorter than two tokens")

    student = convert(copy.deepcopy(teacher), config)
    exact = convert(copy.deepcopy(teacher), config.model_copy(update={"attention": "sliding", "window": ids.shape[1]}))
    with torch.no_grad():
        teacher_logits = teacher(ids, use_cache=False).logits
        exactness = _relative_error(exact(ids, use_cache=False).logits, teacher_logits)

    layers = list(linearized_layers(student))
    converted = [layer.layer_idx for layer in layers]
    kept = [i for i in range(len(family.decoder_layers(student))) if i not in converted]
    trainable = sum(p.numel() for p in trainable_parameters(student).values())
    total = sum(p.numel() for p in teacher.parameters())
    report = {
        "model": model_spec,
        "family": family.name,
        "converted_layers": converted,
        "softmax_layers": kept,
        "trainable_parameters": trainable,
        "trainable_fraction": trainable / total,
        "tokens": ids.shape[1],
        "full_window_relative_error": exactness,
        "teacher_ppl": _perplexity(teacher, ids),
        "untrained_ppl": _perplexity(student, ids),
    }
    echo(f"model            {model_spec} ({family.name}, {total / 1e6:.2f}M parameters)")
    echo(f"attention        {config.attention}, feature map {config.feature_map}, window {config.window}")
    echo(f"converted layers {converted}")
    echo(f"softmax layers   {kept}")
    echo(f"trainable        {trainable:,} parameters ({100 * trainable / total:.3f}% of the base model)")
    echo(f"exactness        window over all {ids.shape[1]} tokens reproduces the teacher's logits "
         f"to {exactness:.1e} relative")
    echo(f"perplexity       teacher {report['teacher_ppl']:.3f}, converted before training "
         f"{report['untrained_ppl']:.3f} on {ids.shape[1]} tokens")
    return report


@app.command("convert")
def convert_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Local HF model folder, hub id, .gguf file, or 'gemma3-270m' (the packaged default)."),
    attention: Optional[str] = typer.Option(None, help="lolcats (default) | sliding | linear | window"),
    feature_map: Optional[str] = typer.Option(None, help="hedgehog (default) | t2r | elu | relu | taylor"),
    window: Optional[int] = typer.Option(None, help="Softmax window in tokens (default 128; 64 for LoLCATs as published)."),
    sinks: Optional[int] = typer.Option(None, help="Attention sinks: the first N tokens of each row stay softmax terms (default 4)."),
    gate: Optional[str] = typer.Option(None, help="scalar (default) | none: a learned decay per head on the linear state."),
    feature_dim: Optional[int] = typer.Option(None, help="Feature-map width per head (default 64; hedgehog gives 2x)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with LinearizeConfig keys; flags given here override it."),
    text: Optional[Path] = typer.Option(None, help="Text file for the quality check (default: a built-in sentence)."),
    seq_len: int = typer.Option(512, help="Tokens of --text used for the check."),
) -> None:
    """Convert MODEL (untrained feature maps) and report what changed and how far the untrained model is.

    Prints the converted layers, trainable parameters, an exactness check (a window covering the whole
    input must reproduce the teacher's logits) and teacher vs untrained-converted perplexity on the text.
    Training (attention transfer, LoRA) is `lolcats linearize`.
    """
    settings = load_yaml(config) if config else {}
    flags = dict(attention=attention, feature_map=feature_map, window=window, sinks=sinks, gate=gate, feature_dim=feature_dim)
    settings.update({key: value for key, value in flags.items() if value is not None})
    try:
        linearize_config = LinearizeConfig(**settings)
        conversion_report(model, linearize_config, text=text, seq_len=seq_len, echo=typer.echo)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        fail(err)
