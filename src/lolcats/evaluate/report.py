"""`lolcats report`: one self-contained HTML page about a lolcats output folder.

The page reads only what `lolcats linearize`, the evaluation and the decode benchmark left in the folder:
lolcats.json (required), logs/<stage>.jsonl, eval*.json and decode*.json. Every figure is a PNG inlined as
base64 and there is no script or external link, so the page can be attached to an issue or opened offline;
every string taken from those files goes through html.escape, since file and task names are free text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..artifacts import atomic_write_bytes, read_manifest
from ..jsonl import jsonl_objects
from .verdict import comparisons, result_rows, verdict_lines

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } small { color: #666; font-weight: normal; }
img { max-width: 100%; } code { font-size: .9em; }
"""


# ---- reading the folder --------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; a damaged file is a ValueError naming it rather than json's traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a training log; a bad line is a ValueError naming file and line."""
    return [record for _, record in jsonl_objects(path)]


def _stage_logs(directory: Path, manifest: Mapping) -> dict[str, list[dict]]:
    """stage name -> log records, in the order the manifest ran the stages (others after, by name)."""
    order = list(manifest.get("stages") or {})
    paths = sorted((directory / "logs").glob("*.jsonl"),
                   key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))
    return {path.stem: _read_jsonl(path) for path in paths}


def _eval_results(directory: Path) -> dict[str, dict]:
    """file name -> evaluation result, for every eval*.json in the folder."""
    results = {}
    for path in sorted(directory.glob("eval*.json")):
        result = _read_json(path)
        for key in ("perplexity", "tasks"):
            if not isinstance(_part(result, key), dict):
                raise ValueError(f"{path}: '{key}' must be an object")
        if not all(isinstance(score, dict) for score in _part(result, "tasks").values()):
            raise ValueError(f"{path}: every task's result must be an object like {{\"acc\": ...}}")
        results[path.name] = result
    return results


def _decode_results(directory: Path) -> dict[str, dict]:
    """file name -> decode benchmark, checked enough that plotting it cannot fail halfway."""
    results = {}
    for path in sorted(directory.glob("decode*.json")):
        result = _read_json(path)
        contexts = result.get("contexts")
        if not isinstance(contexts, list) or not _decode_models(result):
            raise ValueError(f"{path}: expected 'contexts' and at least one model's measurements")
        for name, measured in _decode_models(result).items():
            for key in ("ms_per_token", "cache_bytes"):
                if not isinstance(measured.get(key), list) or len(measured[key]) != len(contexts):
                    raise ValueError(f"{path}: {name}.{key} must have one value per context")
        results[path.name] = result
    return results


def _decode_models(result: Mapping) -> dict[str, dict]:
    # The layout bench_decode writes: every object-valued key is a model (plot_decode reads it the same way).
    return {name: value for name, value in result.items() if isinstance(value, dict)}


# ---- HTML pieces ---------------------------------------------------------------------------------

def _text(value) -> str:
    """Any value from a file as escaped cell text; lists and objects stay readable as JSON."""
    if value is None:
        return "—"
    # Settings are shown exactly as saved (a learning rate of 1e-05 must not round), in JSON spelling.
    if isinstance(value, (bool, list, dict)):
        value = json.dumps(value)
    return html.escape(str(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value, spec: str) -> str:
    return format(value, spec) if _is_number(value) else "—"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1) -> str:
    """Cells are HTML already (escaped by the caller); columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_values(mapping: Mapping) -> str:
    return _table(["setting", "value"], ([html.escape(str(k)), _text(v)] for k, v in mapping.items()), numeric_from=2)


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _image(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}">'


# ---- figures -------------------------------------------------------------------------------------

def _figure(columns: int = 1, width: float = 5.0, height: float = 3.5):
    # Figure without pyplot renders through Agg and leaves no global figure state behind.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height))
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _layer_bars(axis, series: Mapping[str, Mapping[int, float]], ylabel: str) -> None:
    """Grouped bars: one group per layer, one bar per series; layers missing from a series stay empty."""
    layers = sorted({layer for values in series.values() for layer in values})
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x, layer in enumerate(layers) if layer in values]
        axis.bar(positions, [values[layer] for layer in layers if layer in values], width=width, label=label)
    axis.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axis.set_xlabel("layer")
    axis.set_ylabel(ylabel)
    axis.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        axis.legend()


def _training_png(logs: Mapping[str, list[dict]]) -> bytes:
    figure, axes = _figure(len(logs))
    for axis, (stage, records) in zip(axes, logs.items()):
        train = _points(records, "loss")
        evals = _points(records, "eval_loss")
        if train:
            axis.plot(*zip(*train), label="training loss", alpha=0.8)
        if evals:
            axis.plot(*zip(*evals), marker="o", label="eval loss")
        axis.set_title(stage)
        axis.set_xlabel("tokens")
        axis.set_ylabel("loss")
        axis.grid(True, alpha=0.3)
        axis.legend()
    return _png(figure)


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    # NaN (a diverged step) plots as a gap; null or text cannot be plotted at all, so those are skipped.
    return [(r["tokens"], r[key]) for r in records if _is_number(r.get("tokens")) and _is_number(r.get(key))]


def _decode_png(result: Mapping) -> bytes:
    # plot_decode is the one `lolcats bench decode --plot` uses; it only writes to a path.
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "decode.png"
        plot_decode(dict(result), path)
        return path.read_bytes()


# ---- sections ------------------------------------------------------------------------------------

def _manifest_section(manifest: Mapping) -> str:
    base = manifest.get("base_model") or {}
    parts = [_key_values(base)]
    if manifest.get("conversion"):
        parts += ["<h3>Conversion</h3>", _key_values(manifest["conversion"])]
    lora = manifest.get("lora")
    parts += ["<h3>LoRA</h3>", _key_values(lora) if lora else "<p>none (no LoRA was trained)</p>"]
    if manifest.get("stages"):
        parts += ["<h3>Stages</h3>", _stages_table(manifest["stages"])]
    metrics = manifest.get("metrics") or {}
    if metrics.get("perplexity"):
        parts += ["<h3>Perplexity after training</h3>", _perplexity_table(metrics["perplexity"])]
    if metrics.get("forward_tokens_per_s"):
        speeds = {name: _number(value, ".1f") for name, value in metrics["forward_tokens_per_s"].items()}
        parts += ["<h3>Forward tokens per second</h3>",
                  _table([html.escape(name) for name in speeds], [list(speeds.values())], numeric_from=0)]
    # Run settings and versions are long and rarely the point; keep them folded.
    for title, key in (("Data", "data"), ("Run settings", "run"), ("Versions", "versions")):
        if manifest.get(key):
            parts.append(f"<details><summary>{title}</summary>{_key_values(manifest[key])}</details>")
    return _section("Model and run", *parts)


def _stages_table(stages: Mapping) -> str:
    rows = []
    for name, stage in stages.items():
        stage = stage if isinstance(stage, dict) else {}
        rows.append([html.escape(str(name)), _number(stage.get("steps"), "d"), _number(stage.get("tokens"), ",d"),
                     _number(stage.get("seconds"), ".1f"), _number(stage.get("tokens_per_s"), ".1f"),
                     _number(stage.get("first_eval_loss"), ".4g"), _number(stage.get("best_eval_loss"), ".4g"),
                     _number(stage.get("best_step"), "d")])
    return _table(["stage", "steps", "tokens", "seconds", "tokens/s", "first eval loss", "best eval loss",
                   "best step"], rows)


def _perplexity_table(perplexity: Mapping) -> str:
    rows = [[html.escape(str(text)), _text(row.get("protocol")), _text(row.get("seq_len")),
             *(_number(row.get(key), ".3f") for key in ("teacher", "linearized", "ratio"))]
            for text, row in perplexity.items() if isinstance(row, dict)]
    return _table(["text", "protocol", "seq_len", "teacher", "linearized", "ratio"], rows, numeric_from=2)


def _layers_section(manifest: Mapping) -> str:
    layers = [row for row in (manifest.get("metrics") or {}).get("layers") or []
              if isinstance(row, dict) and "layer" in row]
    # linear_share is null for a layer without a linear term: that layer has no bar, and with none at all
    # the panel is left out.
    panels = [(_head_means(layers, "gamma"), "γ (mean over heads)"),
              (_head_means(layers, "linear_share"), "linear share (mean over heads)")]
    panels = [(values, label) for values, label in panels if values]
    if not panels:
        return ""
    figure, axes = _figure(len(panels))
    for axis, (values, label) in zip(axes, panels):
        _layer_bars(axis, {label: values}, label)
    return _section(
        "Linearized layers",
        "<p>γ scales the sliding-window softmax term against the linear term; the linear share is the mean "
        "fraction of attention mass that goes to the linear term.</p>",
        _image(_png(figure), "per-layer gamma and linear share"),
    )


def _ranking(directory: Path, manifest: Mapping) -> dict | None:
    """The layer ranking of `--softmax-layers auto:K` (in the manifest) or of `lolcats rank-layers` (ranking.json)."""
    if manifest.get("layer_ranking"):
        return manifest["layer_ranking"]
    path = directory / "ranking.json"
    return _read_json(path) if path.is_file() else None


def _ranking_section(ranking: Mapping | None) -> str:
    if not ranking or not ranking.get("layers"):
        return ""
    kept = set(ranking.get("kept") or [])
    kl = {row["layer"]: row["kl"] for row in ranking["layers"]}
    probe = all("passkey_nll" in row for row in ranking["layers"])
    figure, axes = _figure(2 if probe else 1)
    series = {"linearized": {layer: value for layer, value in kl.items() if layer not in kept}}
    if kept:
        series = {"kept as softmax": {layer: kl[layer] for layer in kept}, **series}
    _layer_bars(axes[0], series, "KL(teacher ‖ model) per token, this layer alone")
    if probe:
        nll = {row["layer"]: row["passkey_nll"] for row in ranking["layers"]}
        _layer_bars(axes[1], {"passkey NLL": nll}, "passkey NLL per key token, this layer alone")
        teacher = (ranking.get("teacher") or {}).get("passkey_nll")
        if teacher is not None:
            axes[1].axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
            axes[1].legend()
    by_layer = {row["layer"]: row for row in ranking["layers"]}
    rows = [[str(position), str(layer), _number(by_layer[layer]["kl"], ".5f")]
            + ([_number(by_layer[layer]["passkey_nll"], ".3f"), _number(by_layer[layer]["passkey_acc"], ".2f")] if probe else [])
            + (["kept" if layer in kept else ""] if kept else [])
            for position, layer in enumerate(ranking.get("order") or sorted(kl), 1)]
    header = ["rank", "layer", "KL"] + (["passkey NLL", "passkey acc"] if probe else []) + (["softmax"] if kept else [])
    return _section(
        "Layer ranking",
        f"<p>What linearizing each layer alone costs after stage 1 (every other layer exact softmax), ranked by "
        f"{html.escape(str(ranking.get('by', 'kl')))}, over {ranking.get('tokens', 0):,} held-out tokens.</p>",
        _image(_png(figure), "per-layer cost of linearization"),
        _table(header, rows, numeric_from=2),
    )


def _head_means(layers: list[dict], key: str) -> dict[int, float]:
    """layer -> mean over heads of ``key``, for the layers that have it."""
    means = {}
    for row in layers:
        values = [v for v in row.get(key) or [] if _is_number(v)]
        if values:
            means[row["layer"]] = sum(values) / len(values)
    return means


def _training_section(logs: Mapping[str, list[dict]]) -> str:
    # A log without any loss (a stage that stopped before its first step) would be an empty panel.
    logs = {stage: records for stage, records in logs.items()
            if _points(records, "loss") or _points(records, "eval_loss")}
    if not logs:
        return ""
    return _section("Training", _image(_training_png(logs), "training and eval loss per stage"))


def _eval_label(name: str, result: Mapping) -> str:
    """What a result is called: its kind, else its model, else its file (plain text, not escaped yet)."""
    return str(result.get("kind") or result.get("model") or Path(name).stem)


def _eval_section(results: Mapping[str, dict]) -> str:
    if not results:
        return ""
    parts = []
    table = _eval_table(results)
    if table:
        parts.append(table)
    fidelity = {name: result["fidelity"] for name, result in results.items()
                if isinstance(result.get("fidelity"), dict)}
    if fidelity:
        parts.append(_fidelity(fidelity, results))
    return _section("Evaluation", *parts) if parts else ""


def _eval_table(results: Mapping[str, dict]) -> str:
    """Rows: each perplexity file, then acc and acc_norm of each task; one column per result file."""
    pair = _linearized_and_teacher(results)
    rows = []
    for text in _union(_part(result, "perplexity") for result in results.values()):
        values = {name: _part(result, "perplexity").get(text) for name, result in results.items()}
        rows.append(_eval_row(f"perplexity: {html.escape(str(text))}", values, ".3f", pair, _ratio))
    for task in _union(_part(result, "tasks") for result in results.values()):
        scores = {name: _part(result, "tasks").get(task) or {} for name, result in results.items()}
        counts = sorted({str(score["n"]) for score in scores.values() if "n" in score})
        size = f" <small>(n={'/'.join(counts)})</small>" if counts else ""
        for metric in ("acc", "acc_norm"):
            values = {name: score.get(metric) for name, score in scores.items()}
            if any(value is not None for value in values.values()):
                rows.append(_eval_row(f"{html.escape(str(task))} {metric}{size}", values, ".4f", pair, _difference))
    if not rows:
        return ""
    # Two files may have the same kind, so the file name goes under the label.
    header = ["", *(f"{html.escape(_eval_label(name, result))}<br><small>{html.escape(name)}</small>"
                    for name, result in results.items())]
    return _table(header + (["linearized vs teacher"] if pair else []), rows)


def _part(result: Mapping, key: str) -> dict:
    return result.get(key) or {}


def _linearized_and_teacher(results: Mapping[str, dict]) -> tuple[str, str] | None:
    """The two file names to compare; a comparison only means something with one result on each side."""
    by_kind = {kind: [name for name, result in results.items() if result.get("kind") == kind]
               for kind in ("linearized", "teacher")}
    if len(by_kind["linearized"]) == 1 and len(by_kind["teacher"]) == 1:
        return by_kind["linearized"][0], by_kind["teacher"][0]
    return None


def _eval_row(label: str, values: Mapping[str, object], spec: str, pair, compare) -> list[str]:
    row = [label, *(_number(value, spec) for value in values.values())]
    return row + [compare(values[pair[0]], values[pair[1]])] if pair else row


def _union(mappings: Iterable[Mapping]) -> list:
    """Keys of all mappings, in first-seen order, so rows follow the files rather than the alphabet."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _ratio(linearized, teacher) -> str:
    # Perplexity is compared as a ratio: 1.10× reads the same for a small and a large model.
    return f"{linearized / teacher:.3f}×" if _is_number(linearized) and _is_number(teacher) and teacher else "—"


def _difference(linearized, teacher) -> str:
    return f"{linearized - teacher:+.4f}" if _is_number(linearized) and _is_number(teacher) else "—"


def _fidelity(fidelity: Mapping[str, dict], results: Mapping[str, dict]) -> str:
    labels = {name: _eval_label(name, results[name]) for name in fidelity}
    parts = ["<h3>Fidelity to the teacher</h3>",
             _table(["result", "text", "KL(teacher ‖ model) per token"],
                    [[html.escape(f"{labels[name]} ({name})"), _text(f.get("text")), _number(f.get("kl"), ".4g")]
                     for name, f in fidelity.items()], numeric_from=2)]
    series = {}
    for name, f in fidelity.items():
        values = {row["layer"]: row["attention_mse"] for row in f.get("layers") or []
                  if isinstance(row, dict) and "layer" in row and _is_number(row.get("attention_mse"))}
        if values:
            series[labels[name]] = values
    if series:
        figure, (axis,) = _figure(width=8)
        _layer_bars(axis, series, "attention output MSE")
        parts.append(_image(_png(figure), "per-layer attention MSE against the teacher"))
    return "".join(parts)


def _baselines_section(results: Mapping[str, dict]) -> str:
    """Where linearization shows, for each eval file with baselines, retrieval or loss by position: the categorised
    tasks (MMLU) by category, a passkey heat-map (context × depth) and the loss-by-position curve, the model and its
    baselines side by side in each, then the plain verdict against the training-free window + sinks row."""
    parts = []
    for name, result in results.items():
        rows = result_rows(result)
        pieces = [_categories_table(rows), _retrieval_figures(rows), _positions_figure(rows)]
        found = comparisons(result)
        if found:
            failed = any(c["required"] and not c["beats"] for c in found)
            colour = "#a00" if failed else "#070"
            pieces.append(f'<p style="color:{colour}"><strong>'
                          + "<br>".join(html.escape(line) for line in verdict_lines(result)) + "</strong></p>")
        if any(pieces):
            parts += [f"<h3>{html.escape(name)}: {html.escape(', '.join(rows))}</h3>", *[p for p in pieces if p]]
    return _section("Linearized vs teacher and training-free baselines", *parts) if parts else ""


def _categories_table(rows: Mapping[str, Mapping]) -> str:
    """Per categorised task: acc over all items and the macro average, then each category, one column per row."""
    tables = []
    for task in _union(_part(row, "tasks") for row in rows.values()):
        scores = {label: _part(row, "tasks").get(task) or {} for label, row in rows.items()}
        if not any("categories" in score for score in scores.values()):
            continue
        lines = [[f"{html.escape(task)} acc (all items)", *(_number(s.get("acc"), ".4f") for s in scores.values())],
                 [f"{html.escape(task)} macro acc", *(_number(s.get("macro_acc"), ".4f") for s in scores.values())]]
        for category in _union(score.get("categories") or {} for score in scores.values()):
            cells = [((score.get("categories") or {}).get(category) or {}) for score in scores.values()]
            counts = sorted({str(cell["n"]) for cell in cells if "n" in cell})
            lines.append([f"{html.escape(str(category))} <small>(n={'/'.join(counts)})</small>",
                          *(_number(cell.get("acc"), ".3f") for cell in cells)])
        tables.append(_table(["", *map(html.escape, scores)], lines))
    return "".join(tables)


def _retrieval_figures(rows: Mapping[str, Mapping]) -> str:
    """One heat-map per retrieval task and row: accuracy by context (rows) and depth (columns)."""
    images = []
    for task in _union(_part(row, "retrieval") for row in rows.values()):
        measured = {label: _part(row, "retrieval").get(task) for label, row in rows.items()}
        measured = {label: m for label, m in measured.items() if isinstance(m, dict) and m.get("accuracy")}
        if not measured:
            continue
        figure, axes = _figure(len(measured), width=3.6, height=3.2)
        for axis, (label, m) in zip(axes, measured.items()):
            axis.imshow(m["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            axis.set_xticks(range(len(m["depths"])), [f"{d:g}" for d in m["depths"]], fontsize=7)
            axis.set_yticks(range(len(m["contexts"])), [str(c) for c in m["contexts"]], fontsize=7)
            for i, row in enumerate(m["accuracy"]):
                for j, value in enumerate(row):
                    axis.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6)
            axis.set_title(f"{label}: {m.get('mean', 0):.2f}", fontsize=9)
            axis.set_xlabel("depth")
            axis.set_ylabel("context (tokens)")
        images.append(_image(_png(figure), f"{task} accuracy by context and depth"))
    return "".join(images)


def _positions_figure(rows: Mapping[str, Mapping]) -> str:
    """Mean next-token loss per position bucket, one line per row (x: the bucket's upper edge, log scale)."""
    curves = {label: row["loss_by_position"] for label, row in rows.items()
              if isinstance(row.get("loss_by_position"), dict)}
    if not curves:
        return ""
    figure, (axis,) = _figure(width=7)
    for label, curve in curves.items():
        points = [(high, loss) for high, loss in zip(curve["edges"][1:], curve["mean_loss"]) if _is_number(loss)]
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in the window (bucket's upper edge)")
    axis.set_ylabel("mean next-token loss")
    axis.grid(True, alpha=0.3)
    axis.legend()
    text = next(iter(curves.values())).get("text")
    axis.set_title(f"loss by position on {text}" if text else "loss by position")
    return _image(_png(figure), "next-token loss by position")


def _decode_section(results: Mapping[str, dict]) -> str:
    parts = []
    for name, result in results.items():
        models = _decode_models(result)
        header = ["context"] + [f"{html.escape(model)} {column}" for model in models
                                for column in ("ms/token", "cache MiB", "prefill s", "peak RSS MiB")]
        rows = []
        for i, context in enumerate(result["contexts"]):
            row = [_text(context)]
            for measured in models.values():
                row += [_number(_at(measured, "ms_per_token", i), ".2f"),
                        _number(_mib(_at(measured, "cache_bytes", i)), ".2f"),
                        _number(_at(measured, "prefill_s", i), ".2f"),
                        _number(_mib(_at(measured, "peak_rss_bytes", i)), ".0f")]
            rows.append(row)
        parts += [f"<h3>{html.escape(name)}</h3>", _image(_decode_png(result), f"decode benchmark {name}"),
                  _table(header, rows)]
    return _section("Decode benchmark", *parts) if parts else ""


def _at(measured: Mapping, key: str, index: int):
    values = measured.get(key)
    return values[index] if isinstance(values, list) and index < len(values) else None


def _mib(value):
    return value / 2**20 if _is_number(value) else None


# ---- the page ------------------------------------------------------------------------------------

def build_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write one self-contained HTML page about a lolcats output folder; returns its path (default DIR/report.html)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    # Read everything before drawing, so a damaged file fails fast and no half-made page is written.
    logs = _stage_logs(directory, manifest)
    evals = _eval_results(directory)
    decodes = _decode_results(directory)
    ranking = _ranking(directory, manifest)
    sections = [
        _manifest_section(manifest),
        _layers_section(manifest),
        _ranking_section(ranking),
        _training_section(logs),
        _eval_section(evals),
        _baselines_section(evals),
        _decode_section(decodes),
    ]
    spec = (manifest.get("base_model") or {}).get("spec") or directory.name
    title = html.escape(f"lolcats report: {spec}")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>Folder <code>{html.escape(str(directory))}</code></p>"
        + "".join(section for section in sections if section)
        + "</body></html>\n"
    )
    out = Path(out) if out is not None else directory / REPORT
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def plot_decode(result: dict, path: str | Path) -> None:
    """ms/token and cache MiB against context, one line per model (`lolcats bench decode --plot`)."""
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
