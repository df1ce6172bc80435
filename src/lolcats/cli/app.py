"""The `lolcats` typer app; each command lives in a module of its own beside this one and only parses its
flags, builds a config and calls the library."""

from __future__ import annotations

import typer
from transformers.utils import logging

app = typer.Typer(
    help="Linearize pretrained causal LMs (LoLCATs): `linearize` (attention transfer + LoRA), `generate` "
    "(constant-memory decoding), `eval` / `lm-eval` / `report` (quality against the teacher), `bench decode` "
    "(latency and cache size against context), `rank-layers` (which layers to keep softmax), `convert` "
    "(conversion check).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """lolcats command line."""
    logging.disable_progress_bar()


def fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2) from None
