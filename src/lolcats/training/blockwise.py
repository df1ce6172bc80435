"""Block-wise attention transfer: stage 1 for models that do not fit one device.

Attention transfer feeds every layer the *teacher's* inputs, so a block of layers can train alone once
the teacher's hidden state entering it is known. Three phases, each restartable and runnable apart:

  collect  run the teacher once over every batch stage 1 will see (training steps + held-out) and store
           the hidden states entering each block: safetensors shards (bf16 by default), one folder per
           block, each file written atomically; plan.json (written first) says which batch is where.
  train    one block from its stored inputs: the decoder runs with ``inputs_embeds`` = the stored state
           and every layer outside the block replaced by a pass-through, so each block layer sees the
           residual stream and norms exactly as in the full model. Only the block's layers need weights.
  stitch   merge the per-block feature maps and γ into one stage-1 state for the whole model.

The training loop is the joint one (stages/loop.py) with a ``StoredData`` source that replays the
collected batches in their original order, so a single block covering all layers reproduces joint
training step for step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from transformers import AutoConfig, AutoModelForCausalLM

from ..artifacts import ArtifactError, atomic_save_tensors, atomic_write_json, copy_tensors_into, read_tensors, weights_hash
from ..convert import convert, linearized_layers, set_attention_mode
from ..data import Batch
from ..models import load_base_model, resolve_model_path
from ..runtime import family_for
from . import distributed
from .config import RunConfig
from .loop import StageData, StageSettings, example_data, train_stage
from .prepare import Prepared, prepare
from .transfer import transfer_loss_fn, transfer_parameters

PLAN = "plan.json"
BATCHES = "batches.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def plan_blocks(num_layers: int, block_size: int) -> list[range]:
    if block_size < 1:
        raise ValueError(f"block size must be at least 1, got {block_size}")
    return [range(start, min(start + block_size, num_layers)) for start in range(0, num_layers, block_size)]


def trained_layer_indices(model: nn.Module) -> list[int]:
    """Decoder layers whose converted attention has something for stage 1 to train."""
    return [layer.layer_idx for layer in linearized_layers(model) if layer.use_linear]


def batch_key(batch: Batch) -> str:
    """Content address of a batch (its token ids and padding)."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.attention_mask):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def row_keys(batch: Batch) -> list[str]:
    """Content address of each row: a row's hidden states depend on nothing else (rows never attend to each
    other), and a process training on its share of a global batch finds its rows by content."""
    return [batch_key(Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.labels[i:i + 1]))
            for i in range(batch.input_ids.shape[0])]


def planned_batches(data: StageData, tokens: int) -> tuple[list[Batch], list[Batch]]:
    """(training batches in step order until the token budget, held-out batches): all stage 1 will see."""
    train, seen = [], 0
    for _, batch in data.stream(0):
        if seen >= tokens:
            break
        train.append(batch)
        seen += batch.num_tokens
    return train, data.eval_batches()


def activation_bytes(batches: Sequence[Batch], hidden_size: int, blocks: int, dtype: torch.dtype) -> int:
    """Disk for the stored inputs: (padded) tokens × hidden size × bytes per value × blocks."""
    tokens = sum(batch.input_ids.numel() for batch in batches)
    return tokens * hidden_size * torch.empty((), dtype=dtype).element_size() * blocks


def block_fingerprint(model: nn.Module, block: range) -> str:
    layers = family_for(model.config).decoder_layers(model)
    return weights_hash((f"{j}.{name}", tensor) for j in block for name, tensor in layers[j].state_dict().items())


# ---- collect -------------------------------------------------------------------------------------

def _shard_path(directory: Path, block: int, shard: int) -> Path:
    return directory / f"block-{block:03d}" / f"shard-{shard:05d}.safetensors"


class _Captured(Exception):
    pass


@torch.no_grad()
def collect(
    model: nn.Module,
    train: Sequence[Batch],
    held_out: Sequence[Batch],
    block_size: int,
    directory: Path,
    *,
    identity: dict,
    dtype: str = "bfloat16",
    buffer_bytes: int = 1 << 30,
    echo: Callable[[str], None] = print,
    free_bytes: Callable[[Path], int] | None = None,
    process: tuple[int, int] = (0, 1),
) -> dict:
    """Store the teacher's hidden states entering every block that has layers to train.

    ``model`` is converted (its linearized layers run in softmax mode, the teacher); ``identity`` (base
    model fingerprint, settings) is recorded in plan.json, and a folder collected for another identity
    is refused. Shards already on disk from an interrupted run are kept. With ``process`` = (index, count)
    each of several processes writes every count-th shard; process 0 writes the plan, and the caller marks
    the collection complete (``mark_complete``) once all have finished.
    """
    index, count = process
    directory = Path(directory)
    family = family_for(model.config)
    layers = family.decoder_layers(model)
    blocks = plan_blocks(len(layers), block_size)
    trained = set(trained_layer_indices(model))
    stored_blocks = [b for b, block in enumerate(blocks) if trained & set(block)]
    unique: dict[str, Batch] = {}
    for batch in (*train, *held_out):
        unique.setdefault(batch_key(batch), batch)
    keys = list(unique)
    hidden_size = model.config.get_text_config(decoder=True).hidden_size
    store_dtype = DTYPES[dtype]
    per_batch = [activation_bytes([unique[k]], hidden_size, len(stored_blocks), store_dtype) for k in keys]
    shards: list[list[str]] = [[]]  # batch keys per shard file
    filled = 0
    for key, size in zip(keys, per_batch):
        if shards[-1] and filled + size > buffer_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    rows = {key: row_keys(batch) for key, batch in unique.items()}
    shard_rows = [sorted({row for key in shard for row in rows[key]}) for shard in shards]
    plan = {
        "identity": identity,
        "block_size": block_size,
        "blocks": [[block.start, block.stop] for block in blocks],
        "stored_blocks": stored_blocks,
        "trained_layers": sorted(trained),
        "block_fingerprints": {str(b): block_fingerprint(model, blocks[b]) for b in stored_blocks},
        "hidden_size": hidden_size,
        "dtype": dtype,
        "train_keys": [batch_key(batch) for batch in train],
        "eval_keys": [batch_key(batch) for batch in held_out],
        "shards": shards,
        "shard_rows": shard_rows,
        "complete": False,
    }
    previous = _read_plan(directory) if (directory / PLAN).is_file() else None
    if previous is not None:
        same = {k: v for k, v in previous.items() if k != "complete"} == {k: v for k, v in plan.items() if k != "complete"}
        if not same:
            raise ArtifactError(
                f"{directory} holds activations collected for other settings (base model, data, budget or block "
                "size); remove it or collect into another folder"
            )
        if previous["complete"]:
            echo(f"blockwise collect: {directory} is complete, nothing to do")
            return previous

    total = sum(per_batch)
    todo = [s for s, shard in enumerate(shards)
            if s % count == index and not all(_shard_path(directory, b, s).is_file() for b in stored_blocks)]
    size_of = dict(zip(keys, per_batch))
    needed = sum(size_of[key] for s in todo for key in shards[s])
    tokens = sum(unique[k].input_ids.numel() for k in keys)
    echo(f"blockwise collect: {len(keys)} batches, {tokens:,} tokens (with padding) x hidden {hidden_size} x "
         f"{store_dtype.itemsize} bytes x {len(stored_blocks)} block inputs = {total / 2**30:.2f} GiB "
         f"({needed / 2**30:.2f} GiB still to write) in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    free = (free_bytes or (lambda path: shutil.disk_usage(path).free))(directory)
    if needed > free:
        raise ArtifactError(
            f"blockwise collect needs {needed / 2**30:.2f} GiB in {directory} but only {free / 2**30:.2f} GiB is "
            "free: free space, store elsewhere (--activations), use a larger --block-size, or fewer tokens"
        )
    if previous is None and index == 0:
        atomic_save_tensors({f"{key}.{name}": getattr(unique[key], name).to(torch.int32)
                             for key in keys for name in ("input_ids", "attention_mask", "labels")},
                            directory / BATCHES, {"format": "lolcats-blockwise-batches"})
        atomic_write_json(directory / PLAN, plan)

    starts = {blocks[b].start: b for b in stored_blocks}
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[starts[index]] = hidden.detach().to(store_dtype).cpu()
            if index == max(starts):
                raise _Captured
        return hook

    handles = [layers[index].register_forward_pre_hook(capture(index), with_kwargs=True) for index in starts]
    set_attention_mode(model, "softmax")
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for s in todo:
            tensors: dict[int, dict[str, torch.Tensor]] = {b: {} for b in stored_blocks}
            for key in shards[s]:
                batch = unique[key]
                try:
                    model.get_decoder()(input_ids=batch.input_ids.to(device),
                                        attention_mask=batch.attention_mask.to(device), use_cache=False)
                except _Captured:
                    pass
                for b in stored_blocks:
                    hidden = captured.pop(b)
                    for i, row in enumerate(rows[key]):
                        tensors[b][row] = hidden[i].clone()
            for b in stored_blocks:
                atomic_save_tensors(tensors[b], _shard_path(directory, b, s), {"format": "lolcats-blockwise-activations"})
            echo(f"blockwise collect: shard {s + 1}/{len(shards)} written")
    finally:
        for handle in handles:
            handle.remove()
    if count == 1:
        mark_complete(directory)
        plan["complete"] = True
    return plan


def mark_complete(directory: Path) -> None:
    """Record that every shard of the plan is on disk (checked)."""
    plan = _read_plan(directory)
    missing = [str(_shard_path(directory, b, s)) for s in range(len(plan["shards"])) for b in plan["stored_blocks"]
               if not _shard_path(directory, b, s).is_file()]
    if missing:
        raise ArtifactError(f"collection incomplete: {len(missing)} shard file(s) missing, e.g. {missing[0]}")
    atomic_write_json(Path(directory) / PLAN, {**plan, "complete": True})


def _read_plan(directory: Path) -> dict:
    path = Path(directory) / PLAN
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {PLAN}: run `lolcats blockwise collect` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err})") from None


def read_plan(directory: Path) -> dict:
    """A complete collection's plan (an interrupted collect must be run again to finish)."""
    plan = _read_plan(directory)
    if not plan.get("complete"):
        raise ArtifactError(f"{directory}: collection was interrupted; run `lolcats blockwise collect` again to finish it")
    return plan


# ---- train ---------------------------------------------------------------------------------------

class StoredActivations:
    """The collected inputs of one block, read lazily (memory-mapped) batch by batch."""

    def __init__(self, directory: Path, block: int, plan: dict):
        if block not in plan["stored_blocks"]:
            raise ValueError(f"block {block} has no layers to train: nothing was collected for it")
        self.where: dict[str, Path] = {}
        for s, keys in enumerate(plan["shard_rows"]):
            path = _shard_path(directory, block, s)
            if not path.is_file():
                raise ArtifactError(f"{path} is missing: copy the whole block-{block:03d} folder or collect again")
            self.where.update(dict.fromkeys(keys, path))
        self._open: dict[Path, object] = {}

    def hidden(self, batch: Batch) -> torch.Tensor:
        rows = []
        for key in row_keys(batch):
            path = self.where.get(key)
            if path is None:
                raise ArtifactError(f"no stored activations for a row (key {key}): the collection belongs to other data")
            if path not in self._open:
                self._open[path] = safe_open(str(path), framework="pt")
            rows.append(self._open[path].get_tensor(key))
        return torch.stack(rows)


@dataclass
class StoredData:
    """StageData replaying the collected batches: training steps in their original order, then held-out."""

    directory: Path
    plan: dict

    def __post_init__(self):
        tensors, _ = read_tensors(Path(self.directory) / BATCHES)

        def batch(key: str) -> Batch:
            return Batch(*(tensors[f"{key}.{name}"].to(torch.long) for name in ("input_ids", "attention_mask", "labels")))

        self._train = [batch(key) for key in self.plan["train_keys"]]
        self._eval = [batch(key) for key in self.plan["eval_keys"]]

    def stream(self, start_batch: int) -> Iterator[tuple[int, Batch]]:
        for index in range(start_batch, len(self._train)):
            yield index, self._train[index]

    def eval_batches(self) -> list[Batch]:
        return list(self._eval)


class _PassThrough(nn.Module):
    """Stands in for a decoder layer outside the block: hands the hidden state on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def block_view(model: nn.Module, block: range):
    """Within the context, only the layers of ``block`` compute; the others pass their input through."""
    layers = family_for(model.config).decoder_layers(model)
    saved = {}
    for j in range(len(layers)):
        if j not in block:
            saved[j] = layers[j]
            layers[j] = _PassThrough()
    try:
        yield
    finally:
        for j, layer in saved.items():
            layers[j] = layer


def block_loss_fn(model: nn.Module, activations: StoredActivations, *, mse_scale: float = 1000.0,
                  attention_ce: float = 0.0) -> Callable[[Batch], torch.Tensor]:
    """The stage-1 loss of the layers in view, on stored inputs instead of the embeddings."""

    def inputs(batch: Batch, device: torch.device, dtype: torch.dtype) -> dict:
        return {"inputs_embeds": activations.hidden(batch).to(device=device, dtype=dtype)}

    return transfer_loss_fn(model, mse_scale=mse_scale, attention_ce=attention_ce, decoder_inputs=inputs)


def train_block(
    model: nn.Module,
    block_index: int,
    directory: Path,
    plan: dict,
    settings: StageSettings,
    *,
    run_dir: Path,
    mse_scale: float = 1000.0,
    attention_ce: float = 0.0,
    resume: bool = False,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train one block's feature maps and γ from its stored inputs; returns (tensors, summary)."""

    start, stop = plan["blocks"][block_index]
    block = range(start, stop)
    found = block_fingerprint(model, block)
    if found != plan["block_fingerprints"][str(block_index)]:
        raise ArtifactError(f"block {block_index}: the model's layers {start}-{stop - 1} are not the weights the "
                            "activations were collected with (fingerprint mismatch)")
    activations = StoredActivations(directory, block_index, plan)
    with block_view(model, block):
        parameters = transfer_parameters(model)
        result = train_stage(parameters, block_loss_fn(model, activations, mse_scale=mse_scale, attention_ce=attention_ce),
                             StoredData(directory, plan), settings, run_dir=run_dir, resume=resume, progress=progress)
    return {name: p.detach().clone() for name, p in parameters.items()}, result.summary()


def load_block_model(spec: str, conversion, block: range, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", echo: Callable[[str], None] = print) -> nn.Module:
    """A converted model in which only ``block``'s layers hold weights (read from the checkpoint's
    safetensors); the rest stay on the meta device and never compute. Memory: one block, not the model.

    A base model that is not a safetensors folder (GGUF, hub id) is loaded whole and trimmed.
    """

    location, gguf_file = resolve_model_path(spec)
    files = sorted(Path(location).glob("*.safetensors")) if Path(location).is_dir() and not gguf_file else []
    model = _meta_model_with_block(location, files, block, dtype) if files else None
    if model is None:
        echo("blockwise train: loading the whole base model (partial loading needs a folder of safetensors weights)")
        model = load_base_model(spec, dtype=dtype)
    convert(model, conversion)
    layers = family_for(model.config).decoder_layers(model)
    for j in range(len(layers)):
        if j not in block:
            layers[j] = _PassThrough()  # drops the weights (or meta placeholders) of other layers
    for module in [layers[j] for j in block] + [m for name, m in model.get_decoder().named_children() if name.startswith("rotary")]:
        module.to(device)
    return model.eval()


def _meta_model_with_block(location: str, files: list[Path], block: range, dtype: torch.dtype) -> nn.Module | None:
    """The model skeleton on the meta device with the block's layers (and rotary tables) materialised;
    None when the checkpoint's names do not match the model's (then the caller loads it whole)."""

    config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = family_for(model.config).decoder_layers(model)
    module_names = {module: name for name, module in model.named_modules()}
    wanted = {}
    for j in block:
        prefix = module_names[layers[j]] + "."
        state = layers[j].state_dict()
        if set(state) != {name for name, _ in layers[j].named_parameters()} | {name for name, _ in layers[j].named_buffers()}:
            return None  # non-persistent buffers would come out of to_empty() uninitialised
        wanted.update({prefix + name: (j, name) for name in state})
    loaded: dict[int, dict[str, torch.Tensor]] = {j: {} for j in block}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    j, name = wanted[key]
                    loaded[j][name] = f.get_tensor(key).to(dtype)
    if sum(len(v) for v in loaded.values()) != len(wanted):
        return None
    for j in block:
        layers[j].to_empty(device="cpu")
        layers[j].load_state_dict(loaded[j], strict=True)
    decoder = model.get_decoder()
    for name, module in list(decoder.named_children()):
        if any(True for _ in module.buffers(recurse=False)) and name.startswith("rotary"):
            setattr(decoder, name, type(module)(config=module.config if hasattr(module, "config") else config))
    return model


# ---- stitch --------------------------------------------------------------------------------------

def block_output(run_dir: Path, block: int) -> Path:
    return Path(run_dir) / f"block-{block:03d}" / "feature_maps.safetensors"


def save_block(path: Path, tensors: dict[str, torch.Tensor], summary: dict, plan: dict) -> None:
    atomic_save_tensors(tensors, path, {"format": "lolcats-blockwise-block", "summary": json.dumps(summary),
                                        "identity": json.dumps(plan["identity"], sort_keys=True)})


def stitch(run_dir: Path, plan: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every trained block's tensors merged into one state, and the per-block summaries."""
    merged: dict[str, torch.Tensor] = {}
    summaries: dict[str, dict] = {}
    identity = json.dumps(plan["identity"], sort_keys=True)
    missing = [b for b in plan["stored_blocks"] if not block_output(run_dir, b).is_file()]
    if missing:
        raise ArtifactError(f"blocks {missing} are not trained yet (no {block_output(run_dir, missing[0])}): run "
                            f"`lolcats blockwise train --block {missing[0]}` first")
    for b in plan["stored_blocks"]:
        tensors, metadata = read_tensors(block_output(run_dir, b))
        if metadata.get("identity") != identity:
            raise ArtifactError(f"{block_output(run_dir, b)} was trained from another collection; train it again")
        overlap = set(tensors) & set(merged)
        if overlap:
            raise ArtifactError(f"block {b} repeats tensors of another block: {sorted(overlap)[:3]}")
        merged.update(tensors)
        summaries[str(b)] = json.loads(metadata["summary"])
    return merged, summaries


# ---- the three phases for a run (the CLI's `lolcats blockwise collect|train|stitch`, and linearize) -------

def _blockwise_identity(run: RunConfig, base_fingerprint: dict) -> dict:
    """What the stored activations depend on (the batches themselves are recorded by content)."""
    return {"base_model": base_fingerprint, "conversion": run.conversion.model_dump(mode="json"),
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
        convert(prepared.model, run.conversion)
    stage1 = run.stage1()
    train, held = planned_batches(
        example_data(prepared.train, prepared.held, stage1, seed=run.seed, pad_id=prepared.pad_id), run.stage1_tokens)
    # Every process computes the same plan and writes its share of the shards (process 0 also the plan).
    collect(prepared.model, train, held, block_size, run.activations_dir(),
                      identity=_blockwise_identity(run, prepared.base_fingerprint), dtype=run.activation_dtype,
                      echo=echo, process=(distributed.rank(), distributed.world_size()))
    distributed.barrier()
    if distributed.is_main() and distributed.world_size() > 1:
        mark_complete(run.activations_dir())
    distributed.barrier()
    return read_plan(run.activations_dir())


def blockwise_train(run: RunConfig, block: int, model: torch.nn.Module | None = None,
                    echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Phase 2 for one block: train it from its stored inputs (loading only its layers if ``model`` is None);
    writes <out>/blockwise/block-NNN/feature_maps.safetensors. A block already trained for the same
    collection and settings is not trained again."""
    _require_block_size(run)
    plan = read_plan(run.activations_dir())
    if not 0 <= block < len(plan["blocks"]):
        raise ValueError(f"block {block} does not exist: the model has blocks 0-{len(plan['blocks']) - 1}")
    if block not in plan["stored_blocks"]:
        echo(f"block {block}: no layer to train (layers {plan['blocks'][block]} keep softmax attention)")
        return {}
    if plan["identity"]["block_size"] != run.block_size or plan["identity"]["conversion"] != run.conversion.model_dump(mode="json"):
        raise ArtifactError(f"{run.activations_dir()} was collected with another block size or conversion; collect again")
    run_dir = Path(run.out) / "blockwise"
    output = block_output(run_dir, block)
    training = _block_training(run)
    if output.is_file():
        _, metadata = read_tensors(output)
        summary = json.loads(metadata.get("summary", "{}"))
        if metadata.get("identity") == json.dumps(plan["identity"], sort_keys=True) and summary.get("training") == training:
            echo(f"block {block}: already trained ({output})")
            return summary
    start, stop = plan["blocks"][block]
    if model is None:
        model = load_block_model(run.model, run.conversion, range(start, stop), dtype=run.torch_dtype(),
                                           device=distributed.training_device(), echo=echo)
    torch.manual_seed(run.seed)
    tensors, summary = train_block(
        model, block, run.activations_dir(), plan, run.stage1(),
        run_dir=run_dir / f"block-{block:03d}", mse_scale=run.mse_scale, attention_ce=run.attention_ce,
        resume=run.resume, progress=progress,
    )
    summary = {**summary, "layers": [start, stop], "training": training}
    if distributed.is_main():
        save_block(output, tensors, summary, plan)
    distributed.barrier()
    echo(f"block {block} (layers {start}-{stop - 1}): eval loss {summary['first_eval_loss']:.4g} -> "
         f"{summary['best_eval_loss']:.4g}, {summary['tokens_per_s']:.0f} tok/s; saved {output}")
    return summary


def blockwise_stitch(run: RunConfig, model: torch.nn.Module | None = None, echo: Callable[[str], None] = print) -> dict:
    """Phase 3: merge the blocks into <out>/blockwise/stage1.safetensors (and into ``model`` if given)."""
    plan = read_plan(run.activations_dir())
    run_dir = Path(run.out) / "blockwise"
    tensors, summaries = stitch(run_dir, plan)
    trainings = {json.dumps(summary.get("training"), sort_keys=True) for summary in summaries.values()}
    if len(trainings) > 1:
        raise ArtifactError("the blocks were trained with different stage-1 settings; train them again with one config")
    if model is not None:
        copy_tensors_into(transfer_parameters(model), tensors, "the stitched blocks")
    summary = {"block_size": plan["block_size"], "blocks": summaries,
               "tokens": sum(s["tokens"] for s in summaries.values()),
               "seconds": sum(s["seconds"] for s in summaries.values())}
    if distributed.is_main():
        save_block(run_dir / "stage1.safetensors", tensors, summary, plan)
    echo(f"stitched {len(summaries)} block(s) into {run_dir / 'stage1.safetensors'}")
    return summary


def blockwise_stage1(run: RunConfig, prepared: Prepared, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """All three phases in this process, on the loaded model (each phase skips what is already done)."""
    plan = blockwise_collect(run, prepared, echo)
    for block in plan["stored_blocks"]:
        blockwise_train(run, block, prepared.model, echo=echo, progress=progress)
    return blockwise_stitch(run, prepared.model, echo)
