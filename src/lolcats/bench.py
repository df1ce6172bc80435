"""Decode benchmark: prefill time, per-token latency, cache bytes and peak memory against context length."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .cache import cache_nbytes


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def measure_decode(model, context: int, *, new_tokens: int = 16, warmup: int = 2, seed: int = 0) -> dict:
    """Prefill ``context`` random tokens, then greedily decode ``new_tokens`` one at a time.

    ms_per_token is the mean over the decode steps after ``warmup``; cache_bytes is the cache after them.
    """
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    ids = ids.to(device)
    reset = _reset_peak_rss()
    started = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - started
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    timings = []
    for step in range(warmup + new_tokens):
        started = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if step >= warmup:
            timings.append(time.perf_counter() - started)
        cache = out.cache
    return {
        "prefill_s": prefill_s,
        "ms_per_token": 1000 * sum(timings) / len(timings),
        "cache_bytes": cache_nbytes(cache),
        "peak_rss_bytes": _peak_rss_bytes() if reset else None,
    }


def bench_decode(models: dict, contexts: list[int], *, new_tokens: int = 16, echo=print) -> dict:
    """``models``: name -> model (e.g. linearized, teacher). Result in the `lolcats bench decode` JSON layout."""
    result: dict = {"contexts": list(contexts), "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    for name, model in models.items():
        rows = []
        for context in contexts:
            row = measure_decode(model, context, new_tokens=new_tokens)
            rows.append(row)
            rss = f"{row['peak_rss_bytes'] / 2**20:.0f} MiB" if row["peak_rss_bytes"] else "n/a"
            echo(f"{name:>10}  context {context:>6}: prefill {row['prefill_s']:7.2f} s, "
                 f"{row['ms_per_token']:7.2f} ms/token, cache {row['cache_bytes'] / 2**20:8.2f} MiB, peak RSS {rss}")
        result[name] = {key: [row[key] for row in rows] for key in rows[0]}
    return result


def plot_decode(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = result["contexts"]
    names = [name for name in result if isinstance(result[name], dict)]
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        latency.plot(contexts, result[name]["ms_per_token"], marker="o", label=name)
        memory.plot(contexts, [b / 2**20 for b in result[name]["cache_bytes"]], marker="o", label=name)
    for axis, label in ((latency, "ms per generated token"), (memory, "cache MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    memory.set_yscale("log")
    figure.suptitle("decode after prefilling to each context")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
