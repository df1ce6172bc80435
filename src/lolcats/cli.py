"""Command line: parse, build a config, call the library. No logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .models import DEFAULT_MODEL

app = typer.Typer(
    help="Linearize pretrained causal LMs (LoLCATs). Available now: `linearize` (attention transfer + LoRA) and "
    "`convert` (conversion check). Generation, evaluation, block-wise transfer and export come later.",
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


def recipe_path(config: str) -> Path:
    """A YAML path, or the name of a recipe shipped in lolcats/configs."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = Path(__file__).parent / "configs" / f"{config}.yaml"
    if packaged.is_file():
        return packaged
    raise typer.BadParameter(f"{config} is neither a YAML file nor a packaged recipe "
                             f"({', '.join(p.stem for p in sorted(packaged.parent.glob('*.yaml')))})")


@app.command()
def linearize(
    model: Optional[str] = typer.Option(None, help="Local HF folder, hub id or .gguf file (default: the packaged Gemma-3-270M)."),
    data: Optional[list[Path]] = typer.Option(None, help="Training text (.txt: blank-line separated documents) or .jsonl; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Output folder: lolcats.json, adapter.safetensors, logs/, checkpoints/."),
    config: Optional[str] = typer.Option(None, help="YAML with the same keys as these flags (underscores), or a packaged recipe name (stories260k-cpu, gemma3-270m-cpu); flags override it. Default without --model: gemma3-270m-cpu."),
    attention: Optional[str] = typer.Option(None, help="lolcats | sliding | linear | window"),
    feature_map: Optional[str] = typer.Option(None, help="hedgehog | t2r | elu | relu | taylor"),
    window: Optional[int] = typer.Option(None, help="Softmax window in tokens (default 64)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per training sequence (default 512)."),
    stage1_tokens: Optional[int] = typer.Option(None, help="Attention-transfer tokens; 0 skips stage 1 (LoRA-only baseline)."),
    stage2_tokens: Optional[int] = typer.Option(None, help="LoRA tokens; 0 skips stage 2."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank (default 8; alpha = 2 x rank unless set in YAML)."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order, split and initialisation."),
    eval_text: Optional[list[Path]] = typer.Option(None, help="Text for the final teacher vs linearized perplexity; repeatable."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoints in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Linearize MODEL: convert, train the feature maps (stage 1), LoRA (stage 2), save, report perplexity."""
    from .config import load_yaml
    from .pipeline import RunConfig, linearize as run_pipeline
    from .stages.loop import TrainingError

    if config is None and model is None:
        config = "gemma3-270m-cpu"
    settings = load_yaml(recipe_path(config)) if config else {}
    flags = dict(model=model, data=[str(p) for p in data] if data else None, out=str(out) if out else None,
                 attention=attention, feature_map=feature_map, window=window, seq_len=seq_len,
                 stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens, lora_rank=lora_rank, seed=seed,
                 eval_text=[str(p) for p in eval_text] if eval_text else None)
    settings.update({key: value for key, value in flags.items() if value is not None})
    if lora_rank is not None and "lora_alpha" not in settings:
        settings["lora_alpha"] = 2.0 * lora_rank
    settings["resume"] = resume
    if "out" not in settings:
        settings["out"] = "lolcats-out"
    try:
        run = RunConfig(**settings)
        run_pipeline(run, echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, NotImplementedError, TrainingError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


if __name__ == "__main__":
    app()
