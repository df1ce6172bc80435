"""`lolcats eval` (perplexity, tasks, fidelity to the teacher) and `lolcats lm-eval` (the harness's own CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..evaluate.positions import parse_edges
from ..evaluate.retrieval import DEFAULT_CONTEXTS, DEFAULT_DEPTHS, parse_numbers
from ..evaluate.runner import evaluate_model, format_table
from .app import app, fail


def parse_tasks(tasks: str | None) -> list[str] | None:
    """None (no --tasks): every task file; 'none': no task at all; else the names given."""
    if tasks is None:
        return None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise typer.BadParameter("--tasks is empty; name tasks, or 'none' for no tasks")
    return [] if names == ["none"] else names


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="A linearized output folder or a base model (folder, hub id, .gguf, 'gemma3-270m')."),
    text: Optional[list[Path]] = typer.Option(None, help="Text file for perplexity (BOS + whole file, sliding windows); repeatable."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task names: file stems in --task-dir (default: all there; 'none': no tasks), and the generated retrieval tasks 'passkey' and 'multikey' (greedy generate() over --contexts x --depths)."),
    task_dir: Optional[Path] = typer.Option(None, help="Folder of task .jsonl files (default ../shared/data/eval when present)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N items of each task, or of each category of a categorised task (same items for every model)."),
    num_fewshot: int = typer.Option(0, help="Few-shot examples per item, drawn from the same file (the same category, when the file has categories) with a fixed seed."),
    seq_len: int = typer.Option(1024, help="Window for perplexity and the longest scored sequence for tasks."),
    stride: Optional[int] = typer.Option(None, help="New tokens predicted per perplexity window (default: --seq-len minus 1; smaller gives more context)."),
    max_text_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of each --text file."),
    batch_size: int = typer.Option(8, help="Sequences per forward."),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="For linearized models with --text: per-layer attention error and KL to the teacher."),
    position_buckets: bool = typer.Option(
        False, "--position-buckets", help="Mean next-token loss by position in the window, over the first --text in "
        "non-overlapping windows of --seq-len tokens (BOS + text): buckets 0-64, 64-128, 128-512, 512-1024, then "
        "doubling up to --seq-len (or --position-edges)."),
    position_edges: Optional[str] = typer.Option(
        None, help="Bucket edges for --position-buckets (implies it), comma-separated, e.g. 64,128,512,2048; 0 and "
        "--seq-len are added."),
    baselines: Optional[str] = typer.Option(
        None, help="Comma-separated rows evaluated the same way, beside the model: 'teacher' (the base model), "
        "'window' (the base converted with attention=window under the run's conversion settings; the default "
        "window for a base model) and 'sinks' (the same window plus 4 attention-sink tokens)."),
    recall_cache: Optional[int] = typer.Option(None, help="Evaluate a linearized folder with a sparse recall cache of K keys per layer and head (LoLA; inference only; 0 = none; default: as saved)."),
    contexts: str = typer.Option(",".join(map(str, DEFAULT_CONTEXTS)), help="Prompt lengths in tokens for the retrieval tasks."),
    depths: str = typer.Option(",".join(map(str, DEFAULT_DEPTHS)), help="Needle depths (fractions of the prompt) for the retrieval tasks."),
    trials: int = typer.Option(1, help="Prompts per context x depth for the retrieval tasks (different keys)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """Perplexity, zero/few-shot tasks from local jsonl files and fidelity to the teacher."""
    try:
        edges = parse_edges(position_edges) if position_edges else ([] if position_buckets else None)
        result = evaluate_model(
            model, texts=list(text or []), tasks=parse_tasks(tasks),
            task_dir=task_dir, limit=limit, num_fewshot=num_fewshot, seq_len=seq_len, stride=stride,
            max_text_tokens=max_text_tokens, batch_size=batch_size, with_fidelity=fidelity,
            position_edges=edges, baselines=baselines, recall_cache=recall_cache, contexts=parse_numbers(contexts, int, "--contexts"),
            depths=parse_numbers(depths, float, "--depths"), trials=trials, echo=typer.echo,
        )
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        fail(err)
    typer.echo("")
    typer.echo(format_table(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(
    ctx: typer.Context,
    model: str = typer.Option(..., help="A linearized output folder or a base model."),
) -> None:
    """Run lm-evaluation-harness's own CLI on MODEL; every other argument goes to lm-eval (--tasks, --limit, ...)."""
    try:
        from ..evaluate.lm_eval_model import run_harness_cli
    except ImportError:
        fail(ValueError("lm-eval is not installed: pip install 'lolcats[eval]'"))
    try:
        run_harness_cli(model, list(ctx.args))
    except (ValueError, FileNotFoundError) as err:
        fail(err)
