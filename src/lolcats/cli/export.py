"""`lolcats export`: a linearized run as a standalone Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..export import export as run_export
from .app import app, fail


@app.command("export")
def export_command(
    directory: Path = typer.Argument(..., help="A linearized output folder (from `lolcats linearize`)."),
    out: Path = typer.Option(..., help="The Hugging Face folder to write (new or empty)."),
    keep_lora_adapter: bool = typer.Option(False, "--keep-lora-adapter", help="Keep LoRA as a peft adapter in OUT/lora instead of merging it into the projections (the default). from_pretrained(OUT) then loads the model WITHOUT LoRA, and warns so, until the adapter is applied with peft."),
    merge_lora: bool = typer.Option(False, "--merge-lora", hidden=True, help="No-op: LoRA is merged by default."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16: the weights' dtype in the folder (default: the dtype the run was trained in)."),
    base_model: Optional[str] = typer.Option(None, help="The base model, if it moved since training (same fingerprint)."),
) -> None:
    """Write DIRECTORY as a standalone HF model folder: AutoModelForCausalLM.from_pretrained(OUT,
    trust_remote_code=True) then works with torch and transformers only."""
    try:
        if merge_lora and keep_lora_adapter:
            raise ValueError("--merge-lora and --keep-lora-adapter contradict each other (LoRA is merged by default)")
        run_export(directory, out, keep_lora_adapter=keep_lora_adapter, dtype=dtype, base_model=base_model,
                   echo=typer.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        fail(err)
