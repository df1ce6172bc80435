"""Decode benchmark: prefill time, per-token latency, cache bytes and peak memory against context length.

Models are measured where they are (CPU or CUDA). On CUDA, timings synchronise the device before the clock
is read, and peak device memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats) is reported
beside the process's peak RSS; on the CPU those device figures are None.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import typer

from ..artifacts import base_model_spec, is_linearized_folder, load_model
from ..evaluate.report import plot_decode
from ..evaluate.runner import baseline_model, parse_baselines
from ..runtime.cache import RecurrentLayer, cache_nbytes
from ..runtime.swap import set_recall_cache
from .app import app, fail


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible.

    Memory freed by earlier measurements is first handed back to the kernel (glibc's malloc_trim), so a
    peak is not inflated by what an earlier, larger measurement left in the allocator.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_device(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return True


def _peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _prompt(model, context: int, seed: int = 0) -> torch.Tensor:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def _prefill(model, context: int):
    out = model(_prompt(model, context), use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def measure_prefill(model, context: int) -> dict:
    """Prefill ``context`` random tokens alone: wall time, the process's peak RSS and (CUDA) the peak device
    memory allocated during it (the model's weights included)."""
    device = _device(model)
    reset = _reset_peak_rss()
    _reset_peak_device(device)
    started = time.perf_counter()
    cache, _ = _prefill(model, context)
    _synchronize(device)
    prefill_s = time.perf_counter() - started
    return {"prefill_s": prefill_s, "peak_rss_bytes": _peak_rss_bytes() if reset else None,
            "peak_device_bytes": _peak_device_bytes(device), "prefill_cache_bytes": cache_nbytes(cache)}


@torch.no_grad()
def measure_decode_steps(model, contexts: list[int], *, new_tokens: int = 16, warmup: int = 2) -> dict:
    """ms per greedy token after prefilling to each context, and the cache bytes after decoding.

    All contexts are prefilled first; then every round decodes one token at each context in turn, so slow
    drift of a shared machine (frequency, neighbours, allocator state) hits every context alike. The
    reported figure is the median over ``new_tokens`` rounds after ``warmup``.

    On CUDA, ``decode_peak_device_bytes`` is the peak device memory allocated while decoding at each
    context; every context's cache is resident meanwhile, so it counts all of them (and the weights), and
    ``decode_step_device_bytes`` is the most one step added on top of what was allocated before it.
    """
    device = _device(model)
    states = [list(_prefill(model, context)) for context in contexts]
    timings: list[list[float]] = [[] for _ in contexts]
    peaks: list[int | None] = [None for _ in contexts]
    step_bytes: list[int | None] = [None for _ in contexts]
    for round_index in range(warmup + new_tokens):
        for index, (state, samples) in enumerate(zip(states, timings)):
            cache, token = state
            measure_memory = _reset_peak_device(device)  # synchronises, outside the timed part
            before = torch.cuda.memory_allocated(device) if measure_memory else 0
            started = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            state[1] = out.logits[:, -1:].argmax(-1)
            _synchronize(device)
            elapsed = time.perf_counter() - started
            state[0] = out.cache
            if round_index >= warmup:
                samples.append(elapsed)
                if measure_memory:
                    peak = _peak_device_bytes(device)
                    peaks[index] = max(peaks[index] or 0, peak)
                    step_bytes[index] = max(step_bytes[index] or 0, peak - before)
    return {
        "ms_per_token": [1000 * statistics.median(samples) for samples in timings],
        "cache_bytes": [cache_nbytes(cache) for cache, _ in states],
        "decode_peak_device_bytes": peaks,
        "decode_step_device_bytes": step_bytes,
    }


@torch.no_grad()
def cache_bytes_by_context(model, contexts: list[int], *, probe: int = 320) -> list[int]:
    """The generation cache's bytes after prefilling each context (batch 1), without prefilling it: one
    ``probe``-token prefill measures each layer; a linearized layer's state does not grow, a softmax layer holds
    a key and value per token, up to what its sliding window keeps (transformers keeps ``sliding_window - 1``)."""
    out = model(_prompt(model, probe), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    constant, per_token, caps = 0, [], []
    for layer in cache.layers:
        if isinstance(layer, RecurrentLayer):
            constant += layer.nbytes()
            continue
        held = layer.keys.shape[-2]
        window = getattr(layer, "sliding_window", None)
        if window is not None and held >= window - 1:
            raise ValueError(f"the {probe}-token probe fills a {window}-token sliding window: use a shorter probe")
        per_token.append((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() // held)
        caps.append(None if window is None else window - 1)
    return [constant + sum(size * (context if cap is None else min(context, cap)) for size, cap in zip(per_token, caps))
            for context in contexts]


def bench_decode(models: dict, contexts: list[int], *, new_tokens: int = 16, echo=print) -> dict:
    """``models``: name -> model (e.g. linearized, teacher). Result in the `lolcats bench decode` JSON layout."""
    result: dict = {"contexts": list(contexts), "new_tokens": new_tokens, "threads": torch.get_num_threads()}
    for name, model in models.items():
        device = _device(model)
        if device.type == "cuda":  # a string: object-valued keys of the result are models
            result.setdefault("device_name", torch.cuda.get_device_name(device))
        prefills = []
        for context in contexts:
            row = measure_prefill(model, context)
            prefills.append(row)
            rss = f"{row['peak_rss_bytes'] / 2**20:.0f} MiB" if row["peak_rss_bytes"] else "n/a"
            gpu = f", peak device {row['peak_device_bytes'] / 2**20:.0f} MiB" if row["peak_device_bytes"] else ""
            echo(f"{name:>10}  prefill {context:>6} tokens: {row['prefill_s']:7.2f} s, peak RSS {rss}{gpu}")
        decode = measure_decode_steps(model, contexts, new_tokens=new_tokens)
        for context, ms, cache_bytes, peak in zip(contexts, decode["ms_per_token"], decode["cache_bytes"],
                                                  decode["decode_peak_device_bytes"]):
            gpu = f", peak device {peak / 2**20:.0f} MiB" if peak else ""
            echo(f"{name:>10}  decode after {context:>6}: {ms:7.2f} ms/token, cache {cache_bytes / 2**20:8.2f} MiB{gpu}")
        result[name] = {**decode, **{key: [row[key] for row in prefills] for key in prefills[0]},
                        "device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return result


bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench, name="bench")


@bench.command("decode")
def decode_command(
    model: str = typer.Option(..., help="A linearized output folder; its base model is benchmarked beside it as the teacher."),
    contexts: str = typer.Option("1024,4096,16384,32768", help="Comma-separated context lengths to prefill before decoding."),
    new_tokens: int = typer.Option(16, help="Tokens decoded (and timed) after each prefill."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also measure the base model (softmax, KV cache)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of ms/token and cache bytes against context."),
) -> None:
    """Prefill time, ms per generated token, cache bytes and peak RSS at each context, linearized vs teacher."""

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
        result = bench_decode(models, context_list, new_tokens=new_tokens, echo=typer.echo)
        result["model"] = model
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        fail(err)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_decode(result, plot)


@bench.command("cache")
def cache_command(
    model: str = typer.Option(..., help="A linearized output folder (its base model is measured beside it) or a base model."),
    contexts: str = typer.Option("8192,32768", help="Comma-separated context lengths."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Also the base model, for a linearized folder."),
    recall_cache: Optional[int] = typer.Option(None, help="Measure a linearized folder with a sparse recall cache of K keys per layer and head (default: as saved)."),
    baselines: Optional[str] = typer.Option(None, help="Also a linearized folder's training-free rows, as `lolcats eval --baselines` builds them (window, sinks: the run's softmax layers kept, the softmax window alone in the others)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """Generation-cache bytes at each context, from one short prefill (no long prefill needed): what keeping
    layers as softmax, or a recall cache, costs in memory, beside the teacher's full KV cache."""
    try:
        context_list = [int(c) for c in contexts.split(",") if c.strip()]
        if not context_list or min(context_list) < 1:
            raise ValueError(f"--contexts needs positive integers, got {contexts!r}")
        models = {"model": load_model(model)}
        if recall_cache is not None:
            set_recall_cache(models["model"], recall_cache)
        if teacher and is_linearized_folder(model):
            models["teacher"] = load_model(base_model_spec(model),
                                           dtype=models["model"].get_input_embeddings().weight.dtype)
        baseline_names = parse_baselines(baselines)
        if baseline_names and not is_linearized_folder(model):
            raise ValueError(f"--baselines needs a linearized folder (its conversion settings); {model} is a base model")
        for name in baseline_names:
            models[name] = baseline_model(model, name)
        result = {"model": model, "contexts": context_list, "recall_cache": recall_cache}
        for name, loaded in models.items():
            result[name] = cache_bytes_by_context(loaded, context_list)
            for context, size in zip(context_list, result[name]):
                typer.echo(f"{name:>8}  cache after {context:>7} tokens: {size / 2**20:10.2f} MiB")
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        fail(err)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
