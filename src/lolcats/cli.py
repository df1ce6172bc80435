"""Command line: parse, build a config, call the library. No logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .models import DEFAULT_MODEL

app = typer.Typer(
    help="Linearize pretrained causal LMs (LoLCATs). Available now: `convert` (conversion demo and check).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """lolcats command line."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@app.command()
def convert(
    model: str = typer.Option(DEFAULT_MODEL, help="Local HF model folder, hub id, .gguf file, or 'gemma3-270m' (the packaged default)."),
    attention: Optional[str] = typer.Option(None, help="lolcats (default) | sliding | linear | window"),
    feature_map: Optional[str] = typer.Option(None, help="hedgehog (default) | t2r | elu | relu | taylor"),
    window: Optional[int] = typer.Option(None, help="Softmax window in tokens (default 64)."),
    feature_dim: Optional[int] = typer.Option(None, help="Feature-map width per head (default 64; hedgehog gives 2x)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with LinearizeConfig keys; flags given here override it."),
    text: Optional[Path] = typer.Option(None, help="Text file for the quality check (default: a built-in sentence)."),
    seq_len: int = typer.Option(512, help="Tokens of --text used for the check."),
) -> None:
    """Convert MODEL (untrained feature maps) and report what changed and how far the untrained model is.

    Prints the converted layers, trainable parameters, an exactness check (a window covering the whole
    input must reproduce the teacher's logits) and teacher vs untrained-converted perplexity on the text.
    Training (attention transfer, LoRA) is not available yet.
    """
    from .demo import conversion_report
    from .config import LinearizeConfig, load_yaml

    settings = load_yaml(config) if config else {}
    flags = dict(attention=attention, feature_map=feature_map, window=window, feature_dim=feature_dim)
    settings.update({key: value for key, value in flags.items() if value is not None})
    try:
        linearize_config = LinearizeConfig(**settings)
        conversion_report(model, linearize_config, text=text, seq_len=seq_len, echo=typer.echo)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


if __name__ == "__main__":
    app()
