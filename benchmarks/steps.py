"""What the training benchmarks time, on any device: the teacher's plain forward and one optimizer step of a
stage, each the median of a few repeats after a warm-up, with the device synchronised around each."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from lolcats.data import Batch


def random_batch(vocab: int, rows: int, length: int, device: torch.device | str = "cpu") -> Batch:
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)
    return Batch(ids, torch.ones_like(ids), ids.clone())


def teacher_forward(model: torch.nn.Module, batch: Batch) -> Callable[[], None]:
    """The teacher's forward without gradients, logits for every position (as ``model(ids).logits``)."""
    def step() -> None:
        with torch.no_grad():
            model(input_ids=batch.input_ids, use_cache=False)
    return step


def training_step(parameters: Mapping[str, torch.nn.Parameter], loss_fn: Callable[[Batch], torch.Tensor],
                  batch: Batch, lr: float = 1e-5) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(parameters.values(), lr=lr)

    def step() -> None:
        loss = loss_fn(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def median_seconds(step: Callable[[], None], repeats: int, device: torch.device | str = "cpu") -> float:
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict:
    """The process's peak RSS so far (monotonic over the process) and, on a GPU, the device peak since the
    last ``reset_peak_memory``."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.device(device).type == "cuda":
        out["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
