"""`lolcats eval`: perplexity on text files, local tasks and (for linearized models) fidelity to the teacher."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..artifacts import base_model_spec, is_linearized_folder, load_model, read_manifest, tokenizer_for
from ..config import LinearizeConfig
from ..convert import convert
from ..models import load_base_model, resolve_dtype
from ..runtime.swap import set_recall_cache
from .fidelity import fidelity, text_windows
from .perplexity import next_token_nll, rolling_windows, window_batches
from .positions import bucket_edges, loss_by_position
from .retrieval import DEFAULT_CONTEXTS, DEFAULT_DEPTHS, RETRIEVAL_TASKS, evaluate_retrieval
from .scoring import encode, rows_per_forward
from .tasks import evaluate_task, load_task, task_files
from .verdict import verdict_lines

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


BASELINES = ("teacher", "window", "sinks")  # rows of `lolcats eval --baselines` beside the model
BASELINE_SINKS = 4  # the sinks baseline's sink tokens (LoLCATs/Lizard's training-free "window + 4 sinks" row)


def parse_baselines(names: str | list[str] | None) -> list[str]:
    """``"window"`` or ``["window"]`` → ["window"]; an unknown name is an error naming the known ones."""
    if not names:
        return []
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {', '.join(map(repr, unknown))}; known: {', '.join(BASELINES)}")
    return list(dict.fromkeys(names))


def baseline_model(spec: str, name: str):
    """The baseline ``name`` of ``spec``'s base model. ``teacher``: the base model itself, in the run's dtype.
    The training-free baselines are the base converted with
    ``attention="window"`` (the softmax window alone, no linear term), every other conversion setting (window,
    softmax layers, local layers, ...) and the dtype from a linearized folder's manifest (for a base model,
    the default window in fp32). ``window``: no sinks; ``sinks``: ``BASELINE_SINKS`` attention
    sinks (or the run's own, if it has more)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    if is_linearized_folder(spec):
        manifest = read_manifest(Path(spec))
        conversion = LinearizeConfig.model_validate(manifest["conversion"])
        dtype = resolve_dtype(manifest.get("dtype", "float32"), "cpu")
    else:
        conversion, dtype = LinearizeConfig(), torch.float32
    base = load_base_model(base_model_spec(spec), dtype=dtype)
    if name == "teacher":
        return base.eval()
    sinks = 0 if name == "window" else max(BASELINE_SINKS, conversion.sinks)
    # No linear term: nothing for a decay gate or a recall cache to act on.
    return convert(base, conversion, attention="window", sinks=sinks, gate="none", recall_cache=0).eval()


def _position_sample(tokenizer, path: str | Path, max_tokens: int | None) -> list[int]:
    ids = encode(tokenizer, Path(path).read_text(encoding="utf-8"))[:max_tokens]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def _evaluate(model, tokenizer, *, texts, loaded_tasks, limit, num_fewshot, seq_len, stride, max_text_tokens,
              batch_size, position_edges, retrieval, echo) -> dict:
    """Perplexity of each text, each task and (``position_edges`` not None) the loss by position of the first
    text, for one model: the keys every row of the result (the model's and each baseline's) has."""
    result: dict = {"perplexity": {}, "tasks": {}}
    if retrieval["tasks"]:
        result["retrieval"] = {}
    for name in retrieval["tasks"]:
        started = time.perf_counter()
        scores = evaluate_retrieval(model, tokenizer, name, contexts=retrieval["contexts"], depths=retrieval["depths"],
                                    trials=retrieval["trials"], seed=retrieval["seed"], echo=echo)
        scores["seconds"] = time.perf_counter() - started
        result["retrieval"][name] = scores
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
    if position_edges is not None and texts:
        # The first text in non-overlapping windows of seq_len (BOS + text, as text_perplexity): mean loss by
        # the position of the predicted token in its window (positions.py).
        by_position = loss_by_position(model, _position_sample(tokenizer, texts[0], max_text_tokens),
                                       seq_len=seq_len, edges=position_edges or None,
                                       batch_size=rows_per_forward(model, seq_len, batch_size, batch_size // 4))
        result["loss_by_position"] = {"text": Path(texts[0]).name, **by_position}
        echo(f"loss by position on {Path(texts[0]).name}: {by_position['windows']} windows of {seq_len} tokens, "
             + ", ".join(f"{_bucket_label(low, high)} {loss:.4f}" for low, high, loss in
                         zip(by_position["edges"], by_position["edges"][1:], by_position["mean_loss"])
                         if loss is not None))
    return result


def _bucket_label(low: int, high: int) -> str:
    return f"{low}-{high}"


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
    position_edges: list[int] | None = None,
    baselines: str | list[str] | None = None,
    recall_cache: int | None = None,
    contexts: list[int] = DEFAULT_CONTEXTS,
    depths: list[float] = DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """``tasks``: task files of ``task_dir`` by name, and the generated retrieval tasks (``RETRIEVAL_TASKS``:
    passkey, multikey) over ``contexts`` × ``depths``, ``trials`` prompts each (retrieval.py). ``position_edges``:
    None for no loss by position, [] for the default buckets (positions.default_edges), else the bucket edges.
    ``baselines``: names (a list or a comma list) of ``BASELINES`` evaluated the same way, under
    result["baselines"][name]. ``recall_cache``: evaluate a linearized folder with a sparse recall cache of that
    many keys per head (0: none; None: as saved), the inference-time option of runtime/ops_recall.py."""

    linearized = is_linearized_folder(spec)
    baselines = parse_baselines(baselines)
    if position_edges is not None:
        if not texts:
            raise ValueError("the loss by position (--position-buckets) needs a --text file")
        bucket_edges(seq_len, position_edges or None)  # bad edges fail before any model loads
    retrieval_tasks = [name for name in tasks or [] if name in RETRIEVAL_TASKS]
    # tasks None: every task file of the task folder (the CLI without --tasks); a list: those named ([] for none)
    tasks = None if tasks is None else [name for name in tasks if name not in RETRIEVAL_TASKS]
    if retrieval_tasks and (not contexts or not depths or trials < 1):
        raise ValueError("retrieval tasks need at least one context, one depth and one trial")
    task_dir = Path(task_dir) if task_dir else (DEFAULT_TASK_DIR if DEFAULT_TASK_DIR.is_dir() else None)
    if tasks and task_dir is None:
        raise FileNotFoundError(f"--tasks needs --task-dir (the default {DEFAULT_TASK_DIR} does not exist here)")
    files = task_files(task_dir, tasks) if task_dir and (tasks is None or tasks) else []
    loaded_tasks = [load_task(path) for path in files]  # malformed files fail before any model loads
    tokenizer = tokenizer_for(spec)
    model = load_model(spec)
    if recall_cache is not None:
        set_recall_cache(model, recall_cache)
    settings = {"seq_len": seq_len, "stride": stride or seq_len - 1, "max_text_tokens": max_text_tokens,
                "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size}
    if position_edges is not None:
        settings["position_edges"] = list(position_edges) or None
    if baselines:
        settings["baselines"] = baselines
    if recall_cache is not None:
        settings["recall_cache"] = recall_cache
    retrieval = {"tasks": retrieval_tasks, "contexts": list(contexts), "depths": list(depths), "trials": trials,
                 "seed": seed}
    if retrieval_tasks:
        settings["retrieval"] = {key: value for key, value in retrieval.items() if key != "tasks"}
    result: dict = {"model": spec, "kind": "linearized" if linearized else "teacher", "perplexity": {}, "tasks": {},
                    "settings": settings}
    run = dict(texts=texts, loaded_tasks=loaded_tasks, limit=limit, num_fewshot=num_fewshot, seq_len=seq_len,
               stride=stride, max_text_tokens=max_text_tokens, batch_size=batch_size, position_edges=position_edges,
               retrieval=retrieval)
    result.update(_evaluate(model, tokenizer, echo=echo, **run))
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
        del teacher
    if baselines:
        del model  # one model in memory at a time
        result["baselines"] = {}
        for name in baselines:
            baseline = baseline_model(spec, name)
            settings = getattr(baseline, "lolcats_config", None)
            window, sinks = (settings.window, settings.sinks) if settings else (None, None)
            echo(f"baseline {name} (window {window}, sinks {sinks}):")
            result["baselines"][name] = {"window": window, "sinks": sinks, **_evaluate(
                baseline, tokenizer, echo=lambda line, name=name: echo(f"  [{name}] {line}"), **run)}
            del baseline
    return result


def _rows(result: dict) -> list[tuple[str, float | None, int]]:
    """(label, value, decimals) of each line of the table, for the model or one of its baselines."""
    rows = [("ppl " + name, ppl, 4) for name, ppl in result["perplexity"].items()]
    for name, scores in result.get("retrieval", {}).items():
        rows += [(f"{name} {context} tokens", accuracy, 3) for context, accuracy in scores["by_context"].items()]
    for name, scores in result["tasks"].items():
        rows.append((name + " acc", scores["acc"], 4))
        if scores.get("acc_norm") is not None:
            rows.append((name + " acc_norm", scores["acc_norm"], 4))
        if "perplexity" in scores:
            rows.append((name + " perplexity", scores["perplexity"], 4))
        if "macro_acc" in scores:  # a categorised task: acc above is over all items; per category in the JSON
            rows.append((f"{name} macro_acc ({len(scores['categories'])} categories)", scores["macro_acc"], 4))
    if "loss_by_position" in result:
        buckets = result["loss_by_position"]
        for low, high, loss in zip(buckets["edges"], buckets["edges"][1:], buckets["mean_loss"]):
            rows.append(("loss pos " + _bucket_label(low, high), loss, 4))
    if "fidelity" in result:
        rows.append(("KL(teacher ‖ linearized)", result["fidelity"]["kl"], 4))
        for row in result["fidelity"]["layers"]:
            rows.append(("attention MSE layer " + str(row["layer"]), row["attention_mse"], 5))
    return rows


def _cell(value: float | None, decimals: int) -> str:
    return f"{value:>10.{decimals}f}" if value is not None else f"{'-':>10}"


def format_table(result: dict) -> str:
    """One line per metric; with baselines, one column each beside the model's value."""
    baselines = result.get("baselines", {})
    columns = [{label: (value, decimals) for label, value, decimals in _rows(row)} for row in baselines.values()]
    header = f"{'metric':<32} {'value':>10}" + "".join(f" {name:>10}" for name in baselines)
    lines = [f"model: {result['model']} ({result['kind']})", "", header]
    for label, value, decimals in _rows(result):
        cells = "".join(" " + _cell(column.get(label, (None, 0))[0], decimals) for column in columns)
        lines.append(f"{label:<32} {_cell(value, decimals)}{cells}")
    verdict = verdict_lines(result)
    return "\n".join(lines + ([""] + verdict if verdict else []))
