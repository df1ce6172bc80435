"""`lolcats eval`: perplexity on text files, local tasks and (for linearized models) fidelity to the teacher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from ..artifacts import base_model_spec, is_linearized_folder, load_model, tokenizer_for
from ..models import load_base_model
from .fidelity import fidelity, text_windows
from .perplexity import next_token_nll, rolling_windows, window_batches
from .scoring import encode, rows_per_forward
from .tasks import evaluate_task, load_task, task_files

DEFAULT_TASK_DIR = Path("../shared/data/eval")
FIDELITY_SEQ_LEN = 512  # longest window of the fidelity sample (the exact-attention comparison's bound)


def text_perplexity(model, tokenizer, path: str | Path, *, seq_len: int, stride: int | None = None,
                    batch_size: int = 4, max_tokens: int | None = None) -> dict:
    """Token-level perplexity of a file: BOS + its (first ``max_tokens``) tokens, no other special tokens,
    scored by sliding windows."""
    ids = encode(tokenizer, Path(path).read_text(encoding="utf-8"))[:max_tokens]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise ValueError(f"{path}: too little text to score")
    windows = rolling_windows(ids, seq_len=seq_len, stride=stride)
    total_nll, count = next_token_nll(model, window_batches(windows, batch_size))
    return {"ppl": math.exp(total_nll / count), "tokens": count}


def evaluate_model(
    spec: str,
    *,
    texts: list[str | Path] = (),
    tasks: list[str] | None = None,
    task_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seq_len: int = 1024,
    stride: int | None = None,
    max_text_tokens: int | None = None,
    batch_size: int = 8,
    with_fidelity: bool = True,
    fidelity_tokens: int = 4096,
    echo: Callable[[str], None] = print,
) -> dict:

    linearized = is_linearized_folder(spec)
    task_dir = Path(task_dir) if task_dir else (DEFAULT_TASK_DIR if DEFAULT_TASK_DIR.is_dir() else None)
    if tasks and task_dir is None:
        raise FileNotFoundError(f"--tasks needs --task-dir (the default {DEFAULT_TASK_DIR} does not exist here)")
    files = task_files(task_dir, tasks) if task_dir else []
    loaded_tasks = [load_task(path) for path in files]  # malformed files fail before any model loads
    tokenizer = tokenizer_for(spec)
    model = load_model(spec)
    result: dict = {
        "model": spec, "kind": "linearized" if linearized else "teacher", "perplexity": {}, "tasks": {},
        "settings": {"seq_len": seq_len, "stride": stride or seq_len - 1, "max_text_tokens": max_text_tokens,
                     "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size},
    }
    for path in texts:
        # As many windows per forward as the logit budget allows (at least batch_size // 4, as before): each
        # forward of a linearized model costs thousands of small ops, so few large ones beat many small ones.
        scored = text_perplexity(model, tokenizer, path, seq_len=seq_len, stride=stride,
                                 batch_size=rows_per_forward(model, seq_len, batch_size, batch_size // 4),
                                 max_tokens=max_text_tokens)
        result["perplexity"][Path(path).name] = scored["ppl"]
        echo(f"perplexity {Path(path).name}: {scored['ppl']:.4f} ({scored['tokens']:,} tokens)")
    for task in loaded_tasks:
        started = time.perf_counter()
        scores = evaluate_task(model, tokenizer, task, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                               max_length=seq_len)
        seconds = time.perf_counter() - started
        scores["choices_per_minute"] = 60 * scores["choices"] / seconds
        result["tasks"][task.name] = scores
        norm = f", acc_norm {scores['acc_norm']:.4f}" if scores["acc_norm"] is not None else ""
        echo(f"{task.name}: acc {scores['acc']:.4f}{norm} (n={scores['n']}, {scores['choices_per_minute']:.0f} choices/min)")
    if linearized and with_fidelity and texts:

        teacher = load_base_model(base_model_spec(spec))
        # A bounded sample, stated in the JSON: the first `fidelity_tokens` tokens of the first text, in
        # windows of at most FIDELITY_SEQ_LEN tokens (BOS included), whatever the text's length.
        window = min(seq_len, FIDELITY_SEQ_LEN)
        windows = text_windows(tokenizer, Path(texts[0]).read_text(encoding="utf-8"), seq_len=window,
                               max_tokens=fidelity_tokens)
        result["fidelity"] = {"text": Path(texts[0]).name, "seq_len": window, "max_tokens": fidelity_tokens,
                              "windows": len(windows), **fidelity(model, teacher, windows, batch_size=batch_size)}
        echo(f"fidelity on {Path(texts[0]).name}: KL(teacher ‖ linearized) {result['fidelity']['kl']:.4f} nats/token")
    return result


def format_table(result: dict) -> str:
    lines = [f"model: {result['model']} ({result['kind']})", "", f"{'metric':<32} {'value':>10}"]
    for name, ppl in result["perplexity"].items():
        lines.append(f"{'ppl ' + name:<32} {ppl:>10.4f}")
    for name, scores in result["tasks"].items():
        lines.append(f"{name + ' acc':<32} {scores['acc']:>10.4f}")
        if scores.get("acc_norm") is not None:
            lines.append(f"{name + ' acc_norm':<32} {scores['acc_norm']:>10.4f}")
        if "perplexity" in scores:
            lines.append(f"{name + ' perplexity':<32} {scores['perplexity']:>10.4f}")
        if "macro_acc" in scores:  # a categorised task: acc above is over all items; per category in the JSON
            label = f"{name} macro_acc ({len(scores['categories'])} categories)"
            lines.append(f"{label:<32} {scores['macro_acc']:>10.4f}")
    if "fidelity" in result:
        lines.append(f"{'KL(teacher ‖ linearized)':<32} {result['fidelity']['kl']:>10.4f}")
        for row in result["fidelity"]["layers"]:
            lines.append(f"{'attention MSE layer ' + str(row['layer']):<32} {row['attention_mse']:>10.5f}")
    return "\n".join(lines)
