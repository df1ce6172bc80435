"""`lolcats report`: one HTML page for a linearized run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..evaluate.report import build_report
from .app import app, fail


@app.command("report")
def report_command(
    directory: Path = typer.Argument(..., help="A linearized output folder."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default DIR/report.html)."),
) -> None:
    """One HTML page: manifest, training curves, per-layer fidelity, perplexity/task table, decode plot."""
    try:
        typer.echo(str(build_report(directory, out)))
    except (ValueError, FileNotFoundError) as err:
        fail(err)
