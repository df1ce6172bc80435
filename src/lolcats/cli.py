"""Command line: parse, build a config, call the library. No logic of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .models import DEFAULT_MODEL

app = typer.Typer(
    help="Linearize pretrained causal LMs (LoLCATs): `linearize` (attention transfer + LoRA), `generate` "
    "(constant-memory decoding), `eval` / `lm-eval` / `report` (quality against the teacher), `bench decode` "
    "(latency and cache size against context), `convert` (conversion check).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """lolcats command line."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2) from None


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
        _fail(err)


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


def _run_config(config: Optional[str], flags: dict, resume: bool = False):
    """RunConfig from a YAML recipe (default without --model: gemma3-270m-cpu) with the given flags on top."""
    from .config import load_yaml
    from .pipeline import RunConfig

    if config is None and flags.get("model") is None:
        config = "gemma3-270m-cpu"
    settings = load_yaml(recipe_path(config)) if config else {}
    settings.update({key: value for key, value in flags.items() if value is not None})
    if flags.get("lora_rank") is not None and "lora_alpha" not in settings:
        settings["lora_alpha"] = 2.0 * flags["lora_rank"]
    settings["resume"] = resume
    settings.setdefault("out", "lolcats-out")
    return RunConfig(**settings)


_MODEL_HELP = "Local HF folder, hub id or .gguf file (default: the packaged Gemma-3-270M)."
_CONFIG_HELP = ("YAML with the same keys as these flags (underscores), or a packaged recipe name (stories260k-cpu, "
                "gemma3-270m-cpu); flags override it. Default without --model: gemma3-270m-cpu.")
_BLOCK_SIZE_HELP = "Layers per block for block-wise stage 1 (stored teacher activations; see `lolcats blockwise`)."
_ACTIVATIONS_HELP = "Folder for the stored block inputs (default: OUT/blockwise/activations)."


@app.command()
def linearize(
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    data: Optional[list[Path]] = typer.Option(None, help="Training text (.txt: blank-line separated documents) or .jsonl; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Output folder: lolcats.json, adapter.safetensors, logs/, checkpoints/."),
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    attention: Optional[str] = typer.Option(None, help="lolcats | sliding | linear | window"),
    feature_map: Optional[str] = typer.Option(None, help="hedgehog | t2r | elu | relu | taylor"),
    window: Optional[int] = typer.Option(None, help="Softmax window in tokens (default 64)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per training sequence (default 512)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Tokens per optimizer step (default 4096)."),
    micro_batch_tokens: Optional[int] = typer.Option(None, help="Tokens per forward/backward within a step (default 1024; same update): lower it to use less memory."),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Stage 2 recomputes each layer in backward: about half the memory, about a fifth slower."),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float32: the frozen base weights' dtype (auto: bf16 where the device computes it natively)."),
    stage1_tokens: Optional[int] = typer.Option(None, help="Attention-transfer tokens; 0 skips stage 1 (LoRA-only baseline)."),
    stage2_tokens: Optional[int] = typer.Option(None, help="LoRA tokens; 0 skips stage 2."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank (default 8; alpha = 2 x rank unless set in YAML)."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order, split and initialisation."),
    eval_text: Optional[list[Path]] = typer.Option(None, help="Text for the final teacher vs linearized perplexity; repeatable."),
    blockwise: bool = typer.Option(False, "--blockwise", help="Stage 1 block by block from stored teacher activations (needs --block-size)."),
    block_size: Optional[int] = typer.Option(None, help=_BLOCK_SIZE_HELP),
    activations: Optional[Path] = typer.Option(None, help=_ACTIVATIONS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoints in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Linearize MODEL: convert, train the feature maps (stage 1), LoRA (stage 2), save, report perplexity.

    Runs the same under `torchrun --nproc-per-node N -m lolcats.cli linearize ...` (or another launcher that sets
    torch.distributed's environment)
    (data parallel, gloo on CPU, nccl on GPUs): the global batch stays --batch-tokens.
    """
    from .pipeline import linearize as run_pipeline
    from .stages.loop import TrainingError

    if blockwise and block_size is None:
        _fail(ValueError("--blockwise needs --block-size K (layers per block)"))
    if block_size is not None and not blockwise:
        _fail(ValueError("--block-size is for block-wise training: add --blockwise"))
    flags = dict(model=model, data=[str(p) for p in data] if data else None, out=str(out) if out else None,
                 attention=attention, feature_map=feature_map, window=window, seq_len=seq_len,
                 batch_tokens=batch_tokens, micro_batch_tokens=micro_batch_tokens,
                 activation_checkpointing=activation_checkpointing, dtype=dtype, stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens, lora_rank=lora_rank, seed=seed,
                 eval_text=[str(p) for p in eval_text] if eval_text else None, block_size=block_size,
                 activations=str(activations) if activations else None)
    try:
        run_pipeline(_run_config(config, flags, resume), echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, NotImplementedError, TrainingError) as err:
        _fail(err)


blockwise_app = typer.Typer(
    help="Block-wise attention transfer in three phases, each restartable and runnable alone: `collect` (teacher "
    "hidden states at block boundaries), `train --block i` (one block, from its stored inputs, on any machine), "
    "`stitch` (merge the blocks). Then `lolcats linearize --blockwise` with the same settings runs stage 2.",
    no_args_is_help=True,
)
app.add_typer(blockwise_app, name="blockwise")


def _blockwise_run(config, model, data, out, block_size, activations, stage1_tokens, seed, resume=False):
    flags = dict(model=model, data=[str(p) for p in data] if data else None, out=str(out) if out else None,
                 block_size=block_size, activations=str(activations) if activations else None,
                 stage1_tokens=stage1_tokens, seed=seed)
    return _run_config(config, flags, resume)


@blockwise_app.command("collect")
def blockwise_collect(
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    data: Optional[list[Path]] = typer.Option(None, help="Training text or .jsonl; repeatable."),
    out: Optional[Path] = typer.Option(None, help="The run's output folder."),
    block_size: Optional[int] = typer.Option(None, help=_BLOCK_SIZE_HELP),
    activations: Optional[Path] = typer.Option(None, help=_ACTIVATIONS_HELP),
    stage1_tokens: Optional[int] = typer.Option(None, help="Attention-transfer tokens (what is collected)."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order and split."),
) -> None:
    """Run the teacher once; store the hidden states entering each block (refuses if the disk is too small)."""
    from .pipeline import blockwise_collect as collect

    try:
        collect(_blockwise_run(config, model, data, out, block_size, activations, stage1_tokens, seed), echo=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@blockwise_app.command("train")
def blockwise_train(
    block: int = typer.Option(..., help="Index of the block to train (0-based)."),
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    out: Optional[Path] = typer.Option(None, help="The run's output folder."),
    block_size: Optional[int] = typer.Option(None, help=_BLOCK_SIZE_HELP),
    activations: Optional[Path] = typer.Option(None, help=_ACTIVATIONS_HELP),
    stage1_tokens: Optional[int] = typer.Option(None, help="Attention-transfer tokens."),
    seed: Optional[int] = typer.Option(None, help="Seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue this block from its checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train one block from its stored inputs; only its layers' weights are loaded (safetensors folders)."""
    from .distributed import init_from_environment
    from .pipeline import blockwise_train as train
    from .stages.loop import TrainingError

    try:
        init_from_environment()
        train(_blockwise_run(config, model, None, out, block_size, activations, stage1_tokens, seed, resume), block,
              echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, TrainingError) as err:
        _fail(err)


@blockwise_app.command("stitch")
def blockwise_stitch(
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    out: Optional[Path] = typer.Option(None, help="The run's output folder."),
    block_size: Optional[int] = typer.Option(None, help=_BLOCK_SIZE_HELP),
    activations: Optional[Path] = typer.Option(None, help=_ACTIVATIONS_HELP),
) -> None:
    """Merge the trained blocks into OUT/blockwise/stage1.safetensors."""
    from .pipeline import blockwise_stitch as stitch

    try:
        stitch(_blockwise_run(config, model, None, out, block_size, activations, None, None), echo=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command()
def export(
    directory: Path = typer.Argument(..., help="A linearized output folder (from `lolcats linearize`)."),
    out: Path = typer.Option(..., help="The Hugging Face folder to write (new or empty)."),
    keep_lora_adapter: bool = typer.Option(False, "--keep-lora-adapter", help="Keep LoRA as a peft adapter in OUT/lora instead of merging it into the projections (the default). from_pretrained(OUT) then loads the model WITHOUT LoRA, and warns so, until the adapter is applied with peft."),
    merge_lora: bool = typer.Option(False, "--merge-lora", hidden=True, help="No-op: LoRA is merged by default."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16: the weights' dtype in the folder (default: the dtype the run was trained in)."),
    base_model: Optional[str] = typer.Option(None, help="The base model, if it moved since training (same fingerprint)."),
) -> None:
    """Write DIRECTORY as a standalone HF model folder: AutoModelForCausalLM.from_pretrained(OUT,
    trust_remote_code=True) then works with torch and transformers only."""
    from .export import export as run_export

    try:
        if merge_lora and keep_lora_adapter:
            raise ValueError("--merge-lora and --keep-lora-adapter contradict each other (LoRA is merged by default)")
        run_export(directory, out, keep_lora_adapter=keep_lora_adapter, dtype=dtype, base_model=base_model,
                   echo=typer.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(err)


@app.command()
def generate(
    model: str = typer.Option(..., help="A linearized output folder, or a base model (local folder, hub id, .gguf, 'gemma3-270m') to compare."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(128, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Seed for sampling."),
) -> None:
    """Continue PROMPT, streaming tokens as they are produced (constant-size cache for linearized models)."""
    from transformers import TextStreamer

    from .generation import generate_text, load_model, tokenizer_for

    try:
        tokenizer = tokenizer_for(model)
        loaded = load_model(model)
        typer.echo(prompt, nl=False)
        generate_text(loaded, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(err)


bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench, name="bench")


@bench.command("decode")
def bench_decode(
    model: str = typer.Option(..., help="A linearized output folder; its base model is benchmarked beside it as the teacher."),
    contexts: str = typer.Option("1024,4096,16384,32768", help="Comma-separated context lengths to prefill before decoding."),
    new_tokens: int = typer.Option(16, help="Tokens decoded (and timed) after each prefill."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also measure the base model (softmax, KV cache)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of ms/token and cache bytes against context."),
) -> None:
    """Prefill time, ms per generated token, cache bytes and peak RSS at each context, linearized vs teacher."""
    import json

    import torch

    from .bench import bench_decode as run_bench, plot_decode
    from .generation import base_model_spec, is_linearized_folder, load_model

    try:
        context_list = [int(c) for c in contexts.split(",") if c.strip()]
        if not context_list or min(context_list) < 1:
            raise ValueError(f"--contexts needs positive integers, got {contexts!r}")
        if not is_linearized_folder(model):
            raise ValueError(f"{model} is not a linearized output folder (no lolcats.json)")
        if threads:
            torch.set_num_threads(threads)
        models = {"linearized": load_model(model)}
        if teacher:
            # The teacher in the linearized model's dtype: the comparison is of attention, not of precision.
            models["teacher"] = load_model(base_model_spec(model),
                                           dtype=models["linearized"].get_input_embeddings().weight.dtype)
        result = run_bench(models, context_list, new_tokens=new_tokens, echo=typer.echo)
        result["model"] = model
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(err)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_decode(result, plot)


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., help="A linearized output folder or a base model (folder, hub id, .gguf, 'gemma3-270m')."),
    text: Optional[list[Path]] = typer.Option(None, help="Text file for perplexity (BOS + whole file, sliding windows); repeatable."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task names (file stems in --task-dir); default: all there."),
    task_dir: Optional[Path] = typer.Option(None, help="Folder of task .jsonl files (default ../shared/data/eval when present)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N items of each task (same items for every model)."),
    num_fewshot: int = typer.Option(0, help="Few-shot examples per item, drawn from the same file with a fixed seed."),
    seq_len: int = typer.Option(1024, help="Window for perplexity and the longest scored sequence for tasks."),
    stride: Optional[int] = typer.Option(None, help="New tokens predicted per perplexity window (default: --seq-len minus 1; smaller gives more context)."),
    max_text_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of each --text file."),
    batch_size: int = typer.Option(8, help="Sequences per forward."),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="For linearized models with --text: per-layer attention error and KL to the teacher."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """Perplexity, zero/few-shot tasks from local jsonl files and fidelity to the teacher."""
    import json

    from .evaluate.runner import evaluate_model, format_table

    try:
        result = evaluate_model(
            model, texts=list(text or []), tasks=[t for t in tasks.split(",") if t] if tasks else None,
            task_dir=task_dir, limit=limit, num_fewshot=num_fewshot, seq_len=seq_len, stride=stride,
            max_text_tokens=max_text_tokens, batch_size=batch_size, with_fidelity=fidelity, echo=typer.echo,
        )
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(err)
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
        from .evaluate.lm_eval_model import run_harness_cli
    except ImportError:
        _fail(ValueError("lm-eval is not installed: pip install 'lolcats[eval]'"))
    try:
        run_harness_cli(model, list(ctx.args))
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A linearized output folder."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default DIR/report.html)."),
) -> None:
    """One HTML page: manifest, training curves, per-layer fidelity, perplexity/task table, decode plot."""
    from .evaluate.report import build_report

    try:
        typer.echo(str(build_report(directory, out)))
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


if __name__ == "__main__":
    app()
