"""The training loop both stages share: token budget, AdamW, the LR schedule (schedule.py: warmup, plateau,
optional cosine), clipping, held-out evaluation with best-state tracking, atomic checkpoints, exact resume and a
NaN guard.

A stage supplies only its trainable parameters, a ``loss_fn(batch) -> loss`` (a mean over the batch's
tokens) and a ``StageData`` (batches in training order + the held-out batches).

Under a launcher (torchrun) every process walks the same global batches and takes its own
rows; gradients are averaged by torch's DistributedDataParallel, weighted so that the update is the one a
single process would make on the whole global batch. Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..artifacts import atomic_write_bytes
from ..data import Batch, Example, batch_stream, make_batches
from . import distributed
from .checkpoints import load_trainer_checkpoint, save_trainer_checkpoint
from .schedule import StageSchedule


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); the last good checkpoint is left intact."""


@dataclass(frozen=True)
class StageSettings:
    name: str
    tokens: int
    lr: float
    batch_tokens: int = 4096
    warmup_steps: int = 10  # the LR schedule's settings (warmup, plateau, decay): see schedule.py
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 25
    eval_tokens: int = 16384
    checkpoint_every: int = 25
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    decay: str = "none"  # "cosine": after warmup, the LR follows a half cosine to 0 over the token budget
    micro_batch_tokens: int | None = None  # forward/backward in pieces of at most this many padded tokens


@dataclass
class StageResult:
    name: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_eval_loss: float | None = None
    best_step: int | None = None
    first_eval_loss: float | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("history")
        out["tokens_per_s"] = round(self.tokens_per_s, 1)
        return out


class StageData(Protocol):
    """Where a stage's batches come from: the same global batches, in the same order, on every process."""

    def stream(self, start_batch: int) -> Iterator[tuple[int, Batch]]:
        """(global index, batch) from ``start_batch`` on, exactly as an uninterrupted run sees them."""

    def eval_batches(self) -> list[Batch]:
        """The fixed held-out batches of every evaluation."""


@dataclass(frozen=True)
class ExampleData:
    """Batches planned from tokenized examples (data.batch_stream): the usual source."""

    train: Sequence[Example]
    held_out: Sequence[Example]
    batch_tokens: int
    eval_tokens: int
    seed: int
    pad_id: int

    def stream(self, start_batch: int) -> Iterator[tuple[int, Batch]]:
        return batch_stream(self.train, batch_tokens=self.batch_tokens, seed=self.seed, pad_id=self.pad_id,
                            start_batch=start_batch)

    def eval_batches(self) -> list[Batch]:
        """A fixed subset of held-out batches (the same at every evaluation and after a resume)."""
        batches, tokens = [], 0
        for batch in make_batches(self.held_out, batch_tokens=self.batch_tokens, seed=self.seed, epoch=0,
                                  pad_id=self.pad_id):
            if tokens >= self.eval_tokens:
                break
            batches.append(batch)
            tokens += batch.num_tokens
        return batches


def example_data(train: Sequence[Example], held_out: Sequence[Example], settings: StageSettings, *, seed: int,
                 pad_id: int) -> ExampleData:
    return ExampleData(train, held_out, settings.batch_tokens, settings.eval_tokens, seed, pad_id)


def loss_tokens(loss_fn: Callable[[Batch], torch.Tensor], batch: Batch) -> int:
    """How many tokens ``loss_fn`` averages over in ``batch`` (a loss may declare its own count)."""
    count = getattr(loss_fn, "count_tokens", None)
    return count(batch) if count is not None else batch.num_tokens


def evaluate_loss(loss_fn: Callable[[Batch], torch.Tensor], batches: Sequence[Batch], *, split: bool = True) -> float:
    """Token-weighted mean of the loss over ``batches``, without gradients. Under a launcher with ``split``,
    each process scores every world_size-th batch and the sums are combined; an FSDP-sharded model cannot
    split (every process must join every forward), so each process scores them all."""
    split = split and distributed.world_size() > 1
    total = count = 0.0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if split and index % distributed.world_size() != distributed.rank():
                continue
            tokens = loss_tokens(loss_fn, batch)
            total += float(loss_fn(batch)) * tokens
            count += tokens
    if split:
        total, count = distributed.all_reduce_sum([total, count])
    return total / max(count, 1)


class _Loss(torch.nn.Module):
    """The unit DistributedDataParallel wraps: the trained parameters and the stage's loss."""

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], loss_fn: Callable[[Batch], torch.Tensor]):
        super().__init__()
        self.trained = torch.nn.ParameterList(parameters.values())
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(batch)


def _data_parallel(parameters: Mapping[str, torch.nn.Parameter], loss_fn: Callable[[Batch], torch.Tensor],
                   sharded: bool):
    """loss_fn as is in one process or on an FSDP-sharded model (FSDP reduces the gradients itself); under
    a launcher otherwise, wrapped in DDP (which also broadcasts rank 0's starting parameters, so every
    process starts from the same state)."""
    if distributed.world_size() == 1 or sharded:
        return loss_fn
    device = next(iter(parameters.values())).device
    return DistributedDataParallel(_Loss(parameters, loss_fn), device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def train_stage(
    parameters: Mapping[str, torch.nn.Parameter],
    loss_fn: Callable[[Batch], torch.Tensor],
    data: StageData,
    settings: StageSettings,
    *,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> StageResult:
    """Train ``parameters`` on ``settings.tokens`` real tokens of ``data``; leave them at their best
    held-out state. Checkpoints go to run_dir/checkpoints/<name>.safetensors, logs to run_dir/logs/<name>.jsonl."""
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoints" / f"{settings.name}.safetensors"
    log_path = run_dir / "logs" / f"{settings.name}.jsonl"
    parameters = dict(parameters)
    main = distributed.is_main()
    sharded = any(distributed.is_sharded(p) for p in parameters.values())
    train_loss = _data_parallel(parameters, loss_fn, sharded)
    optimizer = torch.optim.AdamW(parameters.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = StageSchedule(optimizer, settings)  # before a resume loads the optimizer (torch's order)
    eval_batches = data.eval_batches()
    result = StageResult(settings.name)
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "best_eval_loss": None, "best_step": None,
             "first_eval_loss": None, "done": False}
    best = {name: p.detach().clone() for name, p in parameters.items()}

    if resume and checkpoint_path.is_file():
        if sharded:
            raise TrainingError(f"{settings.name}: resuming an FSDP-sharded stage is not supported yet; rerun it "
                                "without --resume, or resume with parallel: ddp")
        state = load_trainer_checkpoint(checkpoint_path, parameters, optimizer, extra=best, schedule=schedule)
        distributed.barrier()  # every process has read the checkpoint before rank 0 may rewrite its log
        if main:
            _truncate_log(log_path, state["step"])
    elif log_path.exists() and main:
        log_path.unlink()
    distributed.barrier()
    history = _read_log(log_path)

    writer = _tensorboard(run_dir, settings.name) if main else None
    bar = tqdm(total=settings.tokens, initial=min(state["tokens"], settings.tokens), unit="tok", unit_scale=True,
               desc=settings.name, disable=not (progress and main), dynamic_ncols=True)
    stream = data.stream(state["step"])

    def checkpoint() -> None:
        if sharded:  # every process takes part in gathering the shards; rank 0 writes whole tensors
            whole = {name: distributed.full_tensor(p.detach()) for name, p in parameters.items()}
            whole_best = {name: distributed.full_tensor(t) for name, t in best.items()}
            moments = {index: {key: distributed.full_tensor(value) for key, value in per_param.items()}
                       for index, per_param in optimizer.state_dict()["state"].items()}
            if main:
                save_trainer_checkpoint(checkpoint_path, whole, optimizer, state, extra=whole_best, optimizer_state=moments,
                                        schedule=schedule)
        elif main:
            save_trainer_checkpoint(checkpoint_path, parameters, optimizer, state, extra=best, schedule=schedule)

    def log(record: dict) -> None:
        history.append(record)
        if not main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(f"{settings.name}/{key}", value, record["step"])

    def run_eval() -> None:
        loss = evaluate_loss(loss_fn, eval_batches, split=not sharded)
        if state["first_eval_loss"] is None:
            state["first_eval_loss"] = loss
        improved = state["best_eval_loss"] is None or loss < state["best_eval_loss"]
        if improved:
            state["best_eval_loss"], state["best_step"] = loss, state["step"]
            for name, p in parameters.items():
                best[name].copy_(p.detach())
        schedule.evaluated(improved)
        log({"step": state["step"], "tokens": state["tokens"], "eval_loss": loss})

    log_path.parent.mkdir(parents=True, exist_ok=True)
    if state["step"] == 0 and not state["done"]:
        run_eval()  # the untrained state is a candidate too: training must beat it to be kept
    while not state["done"] and state["tokens"] < settings.tokens:
        try:
            step_index, batch = next(stream)
        except StopIteration:
            raise TrainingError(f"{settings.name}: the data ran out at step {state['step'] + 1} before "
                                f"{settings.tokens:,} tokens") from None
        assert step_index == state["step"], "data stream out of step with the trainer"
        lr = schedule.get_last_lr()[0]  # this step's (one parameter group)
        started = time.perf_counter()
        mine = distributed.shard_rows(batch)
        # This process's share of the global token mean: DDP averages gradients over processes, so scaling
        # by world_size * my_tokens / all_tokens makes the update the one-process update on the whole batch
        # (in one process the scale is exactly 1).
        share = loss_tokens(loss_fn, mine) / max(loss_tokens(loss_fn, batch), 1)
        optimizer.zero_grad(set_to_none=True)
        local_loss = 0.0
        # Micro-batches bound the activations kept for backward; the weighted sum of their token-mean losses
        # is the token mean over the whole batch, so the update is the same (gradient accumulation).
        pieces = [mine] if sharded else micro_batches(mine, settings.micro_batch_tokens)
        mine_tokens = max(loss_tokens(loss_fn, mine), 1)
        with _out_of_memory_explained(settings, pieces[0]):
            for index, piece in enumerate(pieces):
                weight = loss_tokens(loss_fn, piece) / mine_tokens
                last = index == len(pieces) - 1
                with contextlib.nullcontext() if last or not hasattr(train_loss, "no_sync") else train_loss.no_sync():
                    local = train_loss(piece)
                    local_loss += float(local.detach()) * weight
                    (local * (weight * share * distributed.world_size())).backward()
        (loss,) = distributed.all_reduce_sum([local_loss * share])
        if not math.isfinite(loss):
            raise TrainingError(_diverged(settings.name, "loss", loss, state, checkpoint_path))
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(list(parameters.values()), settings.max_grad_norm))
        if not torch.isfinite(grad_norm):
            raise TrainingError(_diverged(settings.name, "gradient norm", float(grad_norm), state, checkpoint_path))
        optimizer.step()
        elapsed = time.perf_counter() - started
        state["step"] += 1
        state["tokens"] += batch.num_tokens
        schedule.advance(state["tokens"])  # the next step's LR (an evaluation below may still lower it)
        state["seconds"] += elapsed
        log({"step": state["step"], "tokens": state["tokens"], "loss": loss, "lr": lr,
             "grad_norm": float(grad_norm), "tokens_per_s": batch.num_tokens / elapsed})
        bar.update(batch.num_tokens)
        bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{batch.num_tokens / elapsed:.0f}")
        finished = state["tokens"] >= settings.tokens
        if finished or state["step"] % settings.eval_every == 0:
            run_eval()
        if finished:
            state["done"] = True
        if finished or state["step"] % settings.checkpoint_every == 0:
            checkpoint()
    bar.close()
    distributed.barrier()  # the final checkpoint is on disk before any process moves on
    if writer is not None:
        writer.close()

    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(best[name])
    result.steps, result.tokens, result.seconds = state["step"], state["tokens"], state["seconds"]
    result.best_eval_loss, result.best_step = state["best_eval_loss"], state["best_step"]
    result.first_eval_loss = state["first_eval_loss"]
    result.history = history
    return result


def micro_batches(batch: Batch, max_tokens: int | None) -> list[Batch]:
    """``batch`` cut into consecutive groups of rows of at most ``max_tokens`` padded tokens (≥ one row each)."""
    rows, length = batch.input_ids.shape
    if max_tokens is None or rows * length <= max_tokens:
        return [batch]
    per_piece = max(1, max_tokens // length)
    return [Batch(batch.input_ids[i:i + per_piece], batch.attention_mask[i:i + per_piece], batch.labels[i:i + per_piece])
            for i in range(0, rows, per_piece)]


@contextmanager
def _out_of_memory_explained(settings: StageSettings, batch: Batch):
    """An allocation failure becomes a TrainingError that says what to change (the step is not half-applied:
    the optimizer has not stepped). The kernel's OOM killer gives no such chance: see ``check_memory``."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "not enough memory" not in str(err) and \
                "out of memory" not in str(err).lower():
            raise
        raise TrainingError(
            f"{settings.name}: out of memory in a micro-batch of {batch.input_ids.shape[0]} rows × "
            f"{batch.input_ids.shape[1]} tokens ({err.__class__.__name__}). Lower --micro-batch-tokens (now "
            f"{settings.micro_batch_tokens}) or --seq-len, add --activation-checkpointing (stage 2), or use --dtype "
            "bfloat16; then run again with --resume"
        ) from None


def _diverged(stage: str, what: str, value: float, state: dict, checkpoint_path: Path) -> str:
    where = (f"the last good checkpoint ({checkpoint_path}) is intact; lower the learning rate and run again "
             "with --resume" if checkpoint_path.is_file() else "no checkpoint had been written yet")
    return f"{stage}: {what} is {value} at step {state['step'] + 1}; training stopped. {where}"


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint: those steps are run again."""
    kept = [r for r in _read_log(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _tensorboard(run_dir: Path, name: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard" / name))
