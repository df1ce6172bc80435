"""`lolcats linearize` and `lolcats blockwise collect|train|stitch`: a RunConfig from a YAML recipe with the
flags on top, then the training package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import LinearizeConfig, load_yaml
from ..training.blockwise import blockwise_collect, blockwise_stitch, blockwise_train
from ..training.config import RunConfig
from ..training.distributed import init_from_environment
from ..training.linearize import linearize as run_linearize
from ..training.linearize import rank_layers, rank_layers_from_run
from ..training.loop import TrainingError
from .app import app, fail


def recipe_path(config: str) -> Path:
    """A YAML path, or the name of a recipe shipped in lolcats/configs."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = Path(__file__).parents[1] / "configs" / f"{config}.yaml"
    if packaged.is_file():
        return packaged
    raise typer.BadParameter(f"{config} is neither a YAML file nor a packaged recipe "
                             f"({', '.join(p.stem for p in sorted(packaged.parent.glob('*.yaml')))})")


def run_config(config: Optional[str], flags: dict, resume: bool = False):
    """RunConfig from a YAML recipe (default without --model: gemma3-270m-cpu) with the given flags on top."""
    if config is None and flags.get("model") is None:
        config = "gemma3-270m-cpu"
    settings = load_yaml(recipe_path(config)) if config else {}
    given = {key: value for key, value in flags.items() if value is not None}
    # The flat conversion flags (--window, --feature-map, ...) land in the nested `conversion` settings.
    conversion = {key: given.pop(key) for key in list(given) if key in LinearizeConfig.model_fields}
    settings.update(given)
    if conversion:
        settings["conversion"] = {**(settings.get("conversion") or {}), **conversion}
    if flags.get("lora_rank") is not None and "lora_alpha" not in settings:
        settings["lora_alpha"] = 2.0 * flags["lora_rank"]
    settings["resume"] = resume
    settings.setdefault("out", "lolcats-out")
    return RunConfig(**settings)


def softmax_layer_flags(text: str | None) -> dict:
    """--softmax-layers: comma-separated layer indices, or auto:K (K layers, or a fraction below 1 of the
    converted ones, chosen by the ranking after stage 1)."""
    if text is None:
        return {}
    if text.startswith("auto:"):
        try:
            count = float(text[len("auto:"):])
        except ValueError:
            count = 0.0
        if not count > 0:  # RunConfig checks the rest (whole number, or a fraction below 1)
            raise typer.BadParameter(f"--softmax-layers auto:K takes a number of layers above 0, got {text!r}")
        return {"softmax_auto": count}
    try:
        return {"softmax_layers": [int(item) for item in text.split(",") if item.strip()]}
    except ValueError:
        raise typer.BadParameter(f"--softmax-layers takes comma-separated layer indices or auto:K, got {text!r}") from None


_MODEL_HELP = "Local HF folder, hub id or .gguf file (default: the packaged Gemma-3-270M)."
_CONFIG_HELP = ("YAML with the same keys as these flags (underscores; conversion flags under `conversion:`), or a "
                "packaged recipe name (stories260k-cpu, "
                "gemma3-270m-cpu); flags override it. Default without --model: gemma3-270m-cpu.")
_BLOCK_SIZE_HELP = "Layers per block for block-wise stage 1 (stored teacher activations; see `lolcats blockwise`)."
_ACTIVATIONS_HELP = "Folder for the stored block inputs (default: OUT/blockwise/activations)."


@app.command("linearize")
def linearize_command(
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    data: Optional[list[Path]] = typer.Option(None, help="Training text (.txt: blank-line separated documents) or .jsonl; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Output folder: lolcats.json, adapter.safetensors, logs/, checkpoints/."),
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    attention: Optional[str] = typer.Option(None, help="lolcats | sliding | linear | window"),
    feature_map: Optional[str] = typer.Option(None, help="hedgehog | t2r | elu | relu | taylor"),
    window: Optional[int] = typer.Option(None, help="Softmax window in tokens (default 128; 64 for LoLCATs as published)."),
    sinks: Optional[int] = typer.Option(None, help="Attention sinks: the first N tokens of each row stay softmax terms for every query (default 4; 0 for LoLCATs as published)."),
    gate: Optional[str] = typer.Option(None, help="scalar (default) | none: a learned data-dependent decay per head on the linear state, trained in stage 1 (none: LoLCATs as published)."),
    linear_rope: Optional[bool] = typer.Option(None, "--linear-rope/--no-linear-rope", help="φ reads q and k after RoPE (LoLCATs) or before it (default, as Lizard: the linear term then carries no position)."),
    recall_cache: Optional[int] = typer.Option(None, help="Sparse recall cache of K keys per layer and head, used at inference (training runs without it); saved with the model (default 0)."),
    feature_dim: Optional[int] = typer.Option(None, help="Feature-map width per head (default 64; hedgehog gives 2x)."),
    gamma_init: Optional[float] = typer.Option(None, help="Initial weight γ of the softmax window against the linear term (default 0.1)."),
    chunk_size: Optional[int] = typer.Option(None, help="Chunk length of the O(L) attention path (default 64)."),
    softmax_layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices that keep softmax attention, or auto:K: after stage 1, keep the K layers whose linearization alone costs most (see `lolcats rank-layers`; K below 1 is a fraction of the converted layers)."),
    rank_by: Optional[str] = typer.Option(None, help="What auto:K ranks by: kl (held-out KL to the teacher, default) | passkey (a retrieval probe past the window)."),
    local_layers: Optional[str] = typer.Option(None, help="keep | linearize: a local/global model's sliding-window layers."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per training sequence (default 512)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Tokens per optimizer step (default 4096)."),
    micro_batch_tokens: Optional[int] = typer.Option(None, help="Tokens per forward/backward within a step (default 1024; same update): lower it to use less memory."),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help="Stage 2 recomputes each layer in backward: about half the memory, about a fifth slower."),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float32: the frozen base weights' dtype (auto: bf16 where the device computes it natively)."),
    stage1_tokens: Optional[int] = typer.Option(None, help="Attention-transfer tokens; 0 skips stage 1 (LoRA-only baseline)."),
    stage2_tokens: Optional[int] = typer.Option(None, help="LoRA tokens; 0 skips stage 2."),
    stage1_from: Optional[Path] = typer.Option(None, help="A finished run (same base and conversion) whose stage-1 φ, γ and gate to reuse instead of training: one stage 1 serves every choice of --softmax-layers."),
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
    if blockwise and block_size is None:
        fail(ValueError("--blockwise needs --block-size K (layers per block)"))
    if block_size is not None and not blockwise:
        fail(ValueError("--block-size is for block-wise training: add --blockwise"))
    flags = dict(model=model, data=[str(p) for p in data] if data else None, out=str(out) if out else None,
                 attention=attention, feature_map=feature_map, window=window, sinks=sinks, gate=gate, linear_rope=linear_rope, recall_cache=recall_cache, feature_dim=feature_dim,
                 gamma_init=gamma_init, chunk_size=chunk_size, local_layers=local_layers,
                 **softmax_layer_flags(softmax_layers), rank_by=rank_by,
                 seq_len=seq_len,
                 batch_tokens=batch_tokens, micro_batch_tokens=micro_batch_tokens,
                 activation_checkpointing=activation_checkpointing, dtype=dtype, stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens, lora_rank=lora_rank, seed=seed,
                 stage1_from=str(stage1_from) if stage1_from else None,
                 eval_text=[str(p) for p in eval_text] if eval_text else None, block_size=block_size,
                 activations=str(activations) if activations else None)
    try:
        run_linearize(run_config(config, flags, resume), echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, NotImplementedError, TrainingError) as err:
        fail(err)


@app.command("rank-layers")
def rank_layers_command(
    from_run: Optional[Path] = typer.Option(None, "--from", help="A finished `linearize` folder: rank with its stage-1 φ and γ (LoRA dropped) on its held-out split, with no training; --model, --config, --tokens and the conversion flags come from its manifest."),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    data: Optional[list[Path]] = typer.Option(None, help="Text (.txt or .jsonl) for stage 1 and the held-out KL; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Folder for ranking.json (and stage 1's logs)."),
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    tokens: Optional[int] = typer.Option(None, help="Stage-1 tokens before ranking (default: the recipe's stage1_tokens)."),
    rank_tokens: Optional[int] = typer.Option(None, help="Held-out tokens the KL is measured on (default 8192)."),
    probe: bool = typer.Option(False, "--probe", help="Also score a passkey probe past the window for each layer."),
    probe_context: Optional[int] = typer.Option(None, help="Passkey prompt length of the probe in tokens (default 1024)."),
    rank_by: Optional[str] = typer.Option(None, help="kl (default) | passkey (implies --probe)."),
    window: Optional[int] = typer.Option(None, help="Softmax window (default 128), as `linearize`."),
    sinks: Optional[int] = typer.Option(None, help="Attention sinks (default 4), as `linearize`."),
    gate: Optional[str] = typer.Option(None, help="none | scalar, as `linearize`."),
    local_layers: Optional[str] = typer.Option(None, help="keep | linearize: rank a local/global model's sliding-window layers too."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default 512)."),
    dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float32."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order, split and initialisation."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Score each layer by what linearizing it alone costs: held-out KL to the teacher (and a passkey probe),
    after a stage 1 of every layer on teacher inputs. Keep the costliest as softmax with --softmax-layers auto:K."""
    flags = dict(model=model, data=[str(p) for p in data] if data else None, out=str(out) if out else None,
                 stage1_tokens=tokens, rank_tokens=rank_tokens, probe_context=probe_context, rank_by=rank_by,
                 window=window, sinks=sinks, gate=gate, local_layers=local_layers, seq_len=seq_len, dtype=dtype,
                 seed=seed, stage2_tokens=0)
    try:
        if from_run is not None:
            recorded = ("model", "stage1_tokens", "window", "sinks", "gate", "local_layers", "seq_len", "dtype", "seed")
            clashing = [f"--{key.replace('_', '-')}" for key in recorded if flags[key] is not None] + (["--config"] if config else [])
            if clashing:
                raise ValueError(f"--from takes the model, conversion and data settings of the run; drop {', '.join(clashing)}")
            overrides = {key: flags[key] for key in ("data", "out", "rank_tokens", "probe_context", "rank_by")
                         if flags[key] is not None}
            rank_layers_from_run(from_run, overrides, probe=probe, echo=typer.echo)
            return
        rank_layers(run_config(config, flags), probe=probe, echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, NotImplementedError, TrainingError) as err:
        fail(err)


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
    return run_config(config, flags, resume)


@blockwise_app.command("collect")
def collect_command(
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
    try:
        blockwise_collect(_blockwise_run(config, model, data, out, block_size, activations, stage1_tokens, seed), echo=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        fail(err)


@blockwise_app.command("train")
def train_command(
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
    try:
        init_from_environment()
        blockwise_train(_blockwise_run(config, model, None, out, block_size, activations, stage1_tokens, seed, resume), block,
              echo=typer.echo, progress=not quiet)
    except (ValueError, FileNotFoundError, TrainingError) as err:
        fail(err)


@blockwise_app.command("stitch")
def stitch_command(
    config: Optional[str] = typer.Option(None, help=_CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    out: Optional[Path] = typer.Option(None, help="The run's output folder."),
    block_size: Optional[int] = typer.Option(None, help=_BLOCK_SIZE_HELP),
    activations: Optional[Path] = typer.Option(None, help=_ACTIVATIONS_HELP),
) -> None:
    """Merge the trained blocks into OUT/blockwise/stage1.safetensors."""
    try:
        blockwise_stitch(_blockwise_run(config, model, None, out, block_size, activations, None, None), echo=typer.echo)
    except (ValueError, FileNotFoundError) as err:
        fail(err)
