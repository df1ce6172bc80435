"""`lolcats linearize`: base model + data -> converted model, attention transfer, LoRA, artifact.

The flow, top to bottom: load the teacher and its fingerprint -> read and split the data -> convert ->
stage 1 (attention transfer) -> stage 2 (LoRA) -> save adapter + manifest -> teacher vs linearized
perplexity. ``load(DIR)`` rebuilds the trained model from what ``linearize`` saved.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from . import __version__, distributed
from .checkpoint import (
    ADAPTER,
    ArtifactError,
    adapter_state,
    atomic_write_json,
    copy_tensors_into,
    fingerprint,
    load_adapter_into,
    matches_fingerprint,
    read_manifest,
    read_tensors,
    save_adapter,
)
from .config import AttentionKind, FeatureMapName, LinearizeConfig
from .convert import convert, linearized_layers, set_attention_mode
from .data import count_tokens, pack_stream, pad_id_for, read_documents, split_held_out, tokenize_documents
from .evaluate.perplexity import perplexity
from .families import family_for
from .models import DEFAULT_MODEL, dtype_name, load_base_model, load_tokenizer, resolve_dtype
from .next_token import final_hidden, next_token_loss_sum
from .stages import blockwise
from .stages.loop import StageSettings, example_data, train_stage
from .stages.lora import (add_lora, lm_loss_fn, lora_parameters, merge_lora, recompute_layers_in_backward,
                          teacher_kl_loss_fn)
from .stages.transfer import transfer_loss_fn, transfer_parameters


class RunConfig(BaseModel):
    """Everything `lolcats linearize` needs; YAML files use these keys, CLI flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL
    data: tuple[str, ...] = ()
    out: str
    # dtype of the frozen base weights: "auto" is bf16 where the device computes bf16 natively (GPUs, CPUs
    # with AVX-512 BF16/AMX), else fp32. φ, γ, LoRA factors, attention state and accumulation stay fp32.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # conversion (LinearizeConfig)
    attention: AttentionKind = "lolcats"
    feature_map: FeatureMapName = "hedgehog"
    window: int = Field(64, ge=1)
    feature_dim: int = Field(64, ge=1)
    softmax_layers: tuple[int, ...] = ()
    local_layers: Literal["keep", "linearize"] = "keep"
    # data
    seq_len: int = Field(512, ge=2)
    batch_tokens: int = Field(4096, ge=2)
    # A step's forward/backward runs in micro-batches of at most this many padded tokens (the same update:
    # gradients accumulate), which bounds the activations kept for backward (a 24-layer 0.5B model in fp32
    # peaked at 17.4 GB of process RSS with 2,048). None: the whole batch at once.
    micro_batch_tokens: int | None = Field(1024, ge=1)
    # Stage 2 recomputes each decoder layer in backward instead of keeping its activations (stages/lora.py):
    # about half the step's memory for about a fifth fewer tokens/s (benchmarks/results/stages-reference.md).
    # Stage 1 needs no such option: it keeps one layer's activations by construction (stages/transfer.py).
    activation_checkpointing: bool = False
    held_out: float = Field(0.05, gt=0)
    add_eos: bool = False
    # document: one document (or piece of one) per row, attention never crosses a boundary (default).
    # stream: BOS-separated documents concatenated into seq_len rows, attention crossing boundaries as
    # in pretraining on packed text; opt in when the teacher was trained and is evaluated that way.
    packing: Literal["document", "stream"] = "document"
    seed: int = 0
    # stage 1
    stage1_tokens: int = Field(300_000, ge=0)
    stage1_lr: float = Field(1e-2, gt=0)
    mse_scale: float = Field(1000.0, gt=0)
    attention_ce: float = Field(0.0, ge=0)
    # block-wise stage 1 (None: joint): blocks of block_size consecutive layers train apart from stored
    # teacher activations (see stages/blockwise.py)
    block_size: int | None = Field(None, ge=1)
    activations: str | None = None  # folder for the stored activations (default: <out>/blockwise/activations)
    activation_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Under a launcher: "ddp" replicates the model in every process; "fsdp" shards it for stage 2 (LoRA), each
    # process holding 1/N of the frozen base weights (stage 1 at scale is block-wise, see block_size).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # stage 2
    stage2_tokens: int = Field(100_000, ge=0)
    stage2_lr: float = Field(1e-4, gt=0)
    stage2_loss: Literal["ce", "kl"] = "ce"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # loop
    warmup_steps: int = Field(10, ge=0)
    lr_decay: Literal["none", "cosine"] = "none"
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(25, ge=1)
    eval_tokens: int = Field(16384, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    # final report
    eval_text: tuple[str, ...] = ()
    eval_protocol: Literal["documents", "per-document", "bos-window"] = "documents"
    eval_max_tokens: int | None = None
    resume: bool = False

    def conversion(self) -> LinearizeConfig:
        return LinearizeConfig(attention=self.attention, feature_map=self.feature_map, window=self.window,
                               feature_dim=self.feature_dim, softmax_layers=self.softmax_layers,
                               local_layers=self.local_layers)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, distributed.training_device())

    def activations_dir(self) -> Path:
        return Path(self.activations) if self.activations else Path(self.out) / "blockwise" / "activations"

    def _stage(self, name: str, tokens: int, lr: float) -> StageSettings:
        return StageSettings(name=name, tokens=tokens, lr=lr, batch_tokens=self.batch_tokens,
                             warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
                             eval_every=self.eval_every, eval_tokens=self.eval_tokens,
                             checkpoint_every=self.checkpoint_every, decay=self.lr_decay,
                             micro_batch_tokens=self.micro_batch_tokens)

    def stage1(self) -> StageSettings:
        return self._stage("stage1", self.stage1_tokens, self.stage1_lr)

    def stage2(self) -> StageSettings:
        return self._stage("stage2", self.stage2_tokens, self.stage2_lr)


def _versions() -> dict:
    import peft
    import transformers

    return {"lolcats": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


@dataclass
class Prepared:
    """A loaded teacher and its tokenized data, split into training and held-out examples."""

    model: torch.nn.Module
    tokenizer: object
    base_fingerprint: dict
    train: list
    held: list
    pad_id: int
    data_files: list[str]
    eval_files: list[str]
    documents: int


def prepare(run: RunConfig, echo: Callable[[str], None] = print) -> Prepared:
    torch.manual_seed(run.seed)
    dtype = run.torch_dtype()
    echo(f"loading {run.model} ({dtype_name(dtype)})")
    tokenizer = load_tokenizer(run.model)
    model = load_base_model(run.model, dtype=dtype).to(distributed.training_device())
    base_fingerprint = fingerprint(model)

    data_files, eval_files = list(run.data), list(run.eval_text)
    if not data_files:
        if run.model != DEFAULT_MODEL:
            raise ValueError("--data is required unless the model is the embedded default")
        from .demo_data import default_data

        if not distributed.is_main():
            distributed.barrier()  # rank 0 samples (or finds) the demo data first; the others read its cache
        train_file, held_file = default_data(model, tokenizer, base_fingerprint["weights_sha256"], echo=echo)
        if distributed.is_main():
            distributed.barrier()
        data_files, eval_files = [str(train_file)], eval_files or [str(held_file)]

    documents = [doc for path in data_files for doc in read_documents(path)]
    examples = tokenize_documents(documents, tokenizer, run.seq_len, add_eos=run.add_eos)
    held_out = int(run.held_out) if run.held_out >= 1 else run.held_out
    train, held = split_held_out(examples, held_out, run.seed)
    if run.packing == "stream":
        train, held = pack_stream(train, run.seq_len, run.seed), pack_stream(held, run.seq_len, run.seed)
    echo(f"data: {len(documents)} documents, {count_tokens(train):,} training tokens, {count_tokens(held):,} held out")
    return Prepared(model, tokenizer, base_fingerprint, train, held, pad_id_for(tokenizer), data_files, eval_files,
                    len(documents))


def linearize(run: RunConfig, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest written to run.out/lolcats.json.

    Under a launcher (torchrun) every process runs this; training is data parallel,
    and only rank 0 measures perplexity and writes the artifact.
    """
    distributed.init_from_environment()
    main = distributed.is_main()
    if not main:
        echo = _silent
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(run, echo)
    model, tokenizer, train, held, pad_id = prepared.model, prepared.tokenizer, prepared.train, prepared.held, prepared.pad_id
    eval_files = prepared.eval_files

    forward_speed: dict[str, float] = {}

    def measure(who: str) -> dict[str, float]:
        """Perplexity on each --eval-text file, and on the held-out split; times the plain forward."""
        if not main:
            return {}
        started, tokens, scores = time.perf_counter(), 0, {}
        for path in eval_files:
            result = perplexity(model, tokenizer, path, seq_len=run.seq_len, protocol=run.eval_protocol,
                                max_tokens=run.eval_max_tokens)
            scores[path], tokens = result.ppl, tokens + result.tokens
        if tokens:
            forward_speed[who] = tokens / (time.perf_counter() - started)
        scores["held-out split"] = held_out_perplexity(model, held, pad_id, run.batch_tokens, run.eval_tokens)
        return scores

    teacher_ppl = measure("teacher")

    conversion = run.conversion()
    convert(model, conversion)
    layers = list(linearized_layers(model))
    echo(f"converted layers {[layer.layer_idx for layer in layers]}")
    stages: dict[str, dict] = {}

    stage1 = run.stage1()
    if run.stage1_tokens > 0 and any(layer.use_linear for layer in layers):
        if run.block_size:
            stages["stage1"] = blockwise_stage1(run, prepared, echo=echo, progress=progress)
            echo(f"stage 1 (block-wise, {run.block_size} layer(s) a block): "
                 + ", ".join(f"block {b} eval loss {r['first_eval_loss']:.4g} -> {r['best_eval_loss']:.4g}"
                             for b, r in stages["stage1"]["blocks"].items()))
        else:
            result = train_stage(
                transfer_parameters(model), transfer_loss_fn(model, mse_scale=run.mse_scale, attention_ce=run.attention_ce),
                example_data(train, held, stage1, seed=run.seed, pad_id=pad_id), stage1,
                run_dir=out, resume=run.resume, progress=progress,
            )
            stages["stage1"] = result.summary()
            echo(f"stage 1: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
                 f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    set_attention_mode(model, "linear")
    for p in model.parameters():
        p.requires_grad_(False)

    lora = None
    sharded = run.parallel == "fsdp" and distributed.world_size() > 1
    if run.stage2_tokens > 0:
        lora = add_lora(model, rank=run.lora_rank, alpha=run.lora_alpha, targets=run.lora_targets)
        if sharded:
            distributed.shard_model(model, family_for(model.config).decoder_layers(model))
        stage2 = run.stage2()
        recompute_layers_in_backward(model, run.activation_checkpointing)
        try:
            result = train_stage(
                lora_parameters(model), lm_loss_fn(model) if run.stage2_loss == "ce" else teacher_kl_loss_fn(model),
                example_data(train, held, stage2, seed=run.seed + 1, pad_id=pad_id), stage2,
                run_dir=out, resume=run.resume, progress=progress,
            )
        finally:
            recompute_layers_in_backward(model, False)
        stages["stage2"] = result.summary()
        echo(f"stage 2: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
             f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    model.eval()
    whole = {name: distributed.full_tensor(t.detach()) for name, t in adapter_state(model).items()} if sharded else None
    if not main:
        distributed.barrier()  # wait for rank 0's artifact
        return {}
    if whole is not None:
        model = _unsharded(run, lora, whole)

    diagnostics = attention_diagnostics(model, train[: max(1, min(8, len(train)))], pad_id)
    manifest = {
        "base_model": {"spec": run.model, **prepared.base_fingerprint},
        "dtype": dtype_name(run.torch_dtype()),
        "conversion": conversion.model_dump(mode="json"),
        "lora": lora,
        "run": run.model_dump(mode="json"),
        "data": {"files": prepared.data_files, "documents": prepared.documents, "train_tokens": count_tokens(train),
                 "held_out_tokens": count_tokens(held)},
        "stages": stages,
        "versions": _versions(),
        "metrics": {"layers": diagnostics},
        "processes": distributed.world_size(),
    }
    save_adapter(out, model, manifest)

    if lora is not None:
        merge_lora(model)
    linear_ppl = measure("linearized")
    manifest["metrics"]["perplexity"] = {
        path: {"teacher": teacher_ppl[path], "linearized": linear_ppl[path],
               "ratio": linear_ppl[path] / teacher_ppl[path],
               "protocol": run.eval_protocol if path in eval_files else f"held-out split, {run.packing} packing",
               "seq_len": run.seq_len} for path in teacher_ppl
    }
    manifest["metrics"]["forward_tokens_per_s"] = forward_speed
    atomic_write_json(out / "lolcats.json", {"format_version": 1, **manifest})
    for path in teacher_ppl:
        row = manifest["metrics"]["perplexity"][path]
        echo(f"perplexity on {Path(path).name}: teacher {row['teacher']:.3f}, linearized {row['linearized']:.3f} "
             f"(x{row['ratio']:.4f})")
    echo(f"saved {out / ADAPTER} and {out / 'lolcats.json'}")
    distributed.barrier()
    return manifest


def _silent(message: str) -> None:
    pass


def _converted_with_lora(model: torch.nn.Module, conversion: LinearizeConfig, lora: dict | None) -> torch.nn.Module:
    """``model`` converted as recorded, with empty LoRA adapters of the recorded shape (to load tensors into)."""
    convert(model, conversion)
    if lora:
        add_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], dropout=lora.get("dropout", 0.0))
    return model


def _unsharded(run: RunConfig, lora: dict | None, adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A whole copy of the trained model in this process, from the base and the gathered adapter tensors."""
    model = _converted_with_lora(load_base_model(run.model, dtype=run.torch_dtype()), run.conversion(), lora)
    copy_tensors_into(adapter_state(model), adapter, "the gathered FSDP adapter")
    set_attention_mode(model, "linear")
    return model.eval()


# ---- block-wise stage 1 ----------------------------------------------------------------------------

def _blockwise_identity(run: RunConfig, base_fingerprint: dict) -> dict:
    """What the stored activations depend on (the batches themselves are recorded by content)."""
    return {"base_model": base_fingerprint, "conversion": run.conversion().model_dump(mode="json"),
            "block_size": run.block_size, "dtype": run.activation_dtype}


def _block_training(run: RunConfig) -> dict:
    """What a trained block depends on besides its activations: a change retrains it."""
    return {"stage": asdict(run.stage1()), "mse_scale": run.mse_scale,
            "attention_ce": run.attention_ce}


def _require_block_size(run: RunConfig) -> int:
    if not run.block_size:
        raise ValueError("block-wise training needs a block size (--block-size K, or block_size in the YAML)")
    return run.block_size


def blockwise_collect(run: RunConfig, prepared: Prepared | None = None, echo: Callable[[str], None] = print) -> dict:
    """Phase 1: the teacher's hidden states entering each block, for every batch stage 1 will see."""
    block_size = _require_block_size(run)
    if prepared is None:
        prepared = prepare(run, echo)
        convert(prepared.model, run.conversion())
    stage1 = run.stage1()
    train, held = blockwise.planned_batches(
        example_data(prepared.train, prepared.held, stage1, seed=run.seed, pad_id=prepared.pad_id), run.stage1_tokens)
    # Every process computes the same plan and writes its share of the shards (process 0 also the plan).
    blockwise.collect(prepared.model, train, held, block_size, run.activations_dir(),
                      identity=_blockwise_identity(run, prepared.base_fingerprint), dtype=run.activation_dtype,
                      echo=echo, process=(distributed.rank(), distributed.world_size()))
    distributed.barrier()
    if distributed.is_main() and distributed.world_size() > 1:
        blockwise.mark_complete(run.activations_dir())
    distributed.barrier()
    return blockwise.read_plan(run.activations_dir())


def blockwise_train(run: RunConfig, block: int, model: torch.nn.Module | None = None,
                    echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Phase 2 for one block: train it from its stored inputs (loading only its layers if ``model`` is None);
    writes <out>/blockwise/block-NNN/feature_maps.safetensors. A block already trained for the same
    collection and settings is not trained again."""
    _require_block_size(run)
    plan = blockwise.read_plan(run.activations_dir())
    if not 0 <= block < len(plan["blocks"]):
        raise ValueError(f"block {block} does not exist: the model has blocks 0-{len(plan['blocks']) - 1}")
    if block not in plan["stored_blocks"]:
        echo(f"block {block}: no layer to train (layers {plan['blocks'][block]} keep softmax attention)")
        return {}
    if plan["identity"]["block_size"] != run.block_size or plan["identity"]["conversion"] != run.conversion().model_dump(mode="json"):
        raise ArtifactError(f"{run.activations_dir()} was collected with another block size or conversion; collect again")
    run_dir = Path(run.out) / "blockwise"
    output = blockwise.block_output(run_dir, block)
    training = _block_training(run)
    if output.is_file():
        _, metadata = read_tensors(output)
        summary = json.loads(metadata.get("summary", "{}"))
        if metadata.get("identity") == json.dumps(plan["identity"], sort_keys=True) and summary.get("training") == training:
            echo(f"block {block}: already trained ({output})")
            return summary
    start, stop = plan["blocks"][block]
    if model is None:
        model = blockwise.load_block_model(run.model, run.conversion(), range(start, stop), dtype=run.torch_dtype(),
                                           device=distributed.training_device(), echo=echo)
    torch.manual_seed(run.seed)
    tensors, summary = blockwise.train_block(
        model, block, run.activations_dir(), plan, run.stage1(),
        run_dir=run_dir / f"block-{block:03d}", mse_scale=run.mse_scale, attention_ce=run.attention_ce,
        resume=run.resume, progress=progress,
    )
    summary = {**summary, "layers": [start, stop], "training": training}
    if distributed.is_main():
        blockwise.save_block(output, tensors, summary, plan)
    distributed.barrier()
    echo(f"block {block} (layers {start}-{stop - 1}): eval loss {summary['first_eval_loss']:.4g} -> "
         f"{summary['best_eval_loss']:.4g}, {summary['tokens_per_s']:.0f} tok/s; saved {output}")
    return summary


def blockwise_stitch(run: RunConfig, model: torch.nn.Module | None = None, echo: Callable[[str], None] = print) -> dict:
    """Phase 3: merge the blocks into <out>/blockwise/stage1.safetensors (and into ``model`` if given)."""
    plan = blockwise.read_plan(run.activations_dir())
    run_dir = Path(run.out) / "blockwise"
    tensors, summaries = blockwise.stitch(run_dir, plan)
    trainings = {json.dumps(summary.get("training"), sort_keys=True) for summary in summaries.values()}
    if len(trainings) > 1:
        raise ArtifactError("the blocks were trained with different stage-1 settings; train them again with one config")
    if model is not None:
        copy_tensors_into(transfer_parameters(model), tensors, "the stitched blocks")
    summary = {"block_size": plan["block_size"], "blocks": summaries,
               "tokens": sum(s["tokens"] for s in summaries.values()),
               "seconds": sum(s["seconds"] for s in summaries.values())}
    if distributed.is_main():
        blockwise.save_block(run_dir / "stage1.safetensors", tensors, summary, plan)
    echo(f"stitched {len(summaries)} block(s) into {run_dir / 'stage1.safetensors'}")
    return summary


def blockwise_stage1(run: RunConfig, prepared: Prepared, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """All three phases in this process, on the loaded model (each phase skips what is already done)."""
    plan = blockwise_collect(run, prepared, echo)
    for block in plan["stored_blocks"]:
        blockwise_train(run, block, prepared.model, echo=echo, progress=progress)
    return blockwise_stitch(run, prepared.model, echo)


@torch.no_grad()
def held_out_perplexity(model, held, pad_id: int, batch_tokens: int, max_tokens: int) -> float:
    """exp(mean NLL) over the label tokens of (up to ``max_tokens`` of) the held-out examples."""
    from .data import IGNORE_INDEX, make_batches

    device = next(model.parameters()).device
    total = count = 0.0
    for batch in make_batches(held, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
        if count >= max_tokens:
            break
        labels = batch.labels[:, 1:].to(device)
        scored = labels != IGNORE_INDEX
        hidden = final_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device))
        total += float(next_token_loss_sum(model, hidden[:, :-1][scored], labels[scored]))
        count += int(scored.sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def attention_diagnostics(model, examples, pad_id: int) -> list[dict]:
    """Per converted layer: γ per head and the share of attention mass the linear term carries."""
    from .data import make_batches

    layers = list(linearized_layers(model))
    if not layers:
        return []
    batch = make_batches(examples, batch_tokens=10**9, seed=0, epoch=0, pad_id=pad_id)[0]
    set_attention_mode(model, "linear")
    for layer in layers:
        layer.record_linear_share = layer.use_linear
    device = next(model.parameters()).device
    model.get_decoder()(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    rows = []
    for layer in layers:
        layer.record_linear_share = False
        share = layer.linear_share.tolist() if layer.linear_share is not None else None
        rows.append({"layer": layer.layer_idx, "gamma": [round(g, 4) for g in layer.gamma.tolist()],
                     "linear_share": [round(s, 4) for s in share] if share else None})
        layer.linear_share = None
    return rows


def load(directory: str | Path, *, base_model: str | None = None, merge: bool = True, dtype: torch.dtype | None = None):
    """The trained linearized model saved by ``linearize`` in ``directory``, in linear mode, eval().

    ``base_model`` overrides the base recorded in the manifest (e.g. the same weights in another folder);
    it must have the fingerprint the adapter was trained on. ``dtype`` is that of the frozen base weights
    (default: the dtype it was trained in); φ, γ and the attention state stay fp32 in any dtype.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = base_model or manifest["base_model"]["spec"]
    if dtype is None:
        dtype = resolve_dtype(manifest.get("dtype", "float32"), "cpu")
    # fp16 rounds the weights differently from the bf16 samples the fingerprint hashes: check an fp32 load.
    # (Loading again rather than model.to(fp16), which would also round RoPE's inv_freq buffer.)
    model = load_base_model(spec, dtype=torch.float32 if dtype == torch.float16 else dtype)
    which = matches_fingerprint(model, manifest["base_model"])
    if which:
        raise ArtifactError(
            f"{directory} was trained on base model {manifest['base_model']['spec']!r}, but {spec!r} has different "
            f"{which} (fingerprint mismatch): load it with the base model it was trained on"
        )
    if dtype == torch.float16:
        model = load_base_model(spec, dtype=dtype)
    lora = manifest.get("lora")
    _converted_with_lora(model, LinearizeConfig.model_validate(manifest["conversion"]), lora)
    load_adapter_into(model, directory / ADAPTER)
    if lora and merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    set_attention_mode(model, "linear")
    model.lolcats_manifest = manifest
    return model.eval()
