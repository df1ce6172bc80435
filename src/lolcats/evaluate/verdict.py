"""Does the linearized model beat the training-free baseline? The comparison every evaluation table ends with.

A linearized layer adds a trained linear term to a softmax window. The same window with 4 attention sinks and no
linear term costs nothing to build (the "window + sinks" baseline of ``lolcats eval --baselines sinks``); on
Llama-3-8B it beats LoLCATs on MMLU 5-shot (59.8 against 52.8). So a linearized model has earned its training only
where it beats that row, and this module says plainly where it does not:

  categorised tasks (MMLU)   ``acc`` (all items), higher is better
  loss beyond the window     token-weighted mean next-token loss of the position buckets that start at or after
                             2·window (below that a terrace window is exact softmax), lower is better
  retrieval                  mean accuracy over contexts × depths, higher is better (reported, not required)
"""

from __future__ import annotations

from collections.abc import Mapping


def result_rows(result: Mapping) -> dict[str, Mapping]:
    """The evaluated model and each of its baselines, by name, the teacher first: teacher, linearized, window, sinks."""
    rows = {str(result.get("kind", "model")): result, **(result.get("baselines") or {})}
    return dict(sorted(rows.items(), key=lambda item: item[0] != "teacher"))


def loss_beyond(by_position: Mapping, start: int) -> float | None:
    """Token-weighted mean loss of the buckets whose first position is >= ``start`` (None if there are none)."""
    pairs = [(loss, tokens) for low, loss, tokens in zip(by_position["edges"], by_position["mean_loss"],
                                                         by_position["tokens"])
             if low >= start and loss is not None and tokens]
    total = sum(tokens for _, tokens in pairs)
    return sum(loss * tokens for loss, tokens in pairs) / total if total else None


def comparisons(result: Mapping) -> list[dict]:
    """One entry per measure where the linearized model and the window+sinks row can be compared:
    {measure, linearized, sinks, better ("higher" | "lower"), beats (bool), required (bool)}."""
    rows = result_rows(result)
    model, sinks = rows.get("linearized"), rows.get("sinks")
    if model is None or sinks is None:
        return []
    found = []

    def add(measure: str, mine, theirs, better: str, required: bool) -> None:
        if mine is None or theirs is None:
            return
        beats = mine > theirs if better == "higher" else mine < theirs
        found.append({"measure": measure, "linearized": mine, "sinks": theirs, "better": better, "beats": beats,
                      "required": required})

    for task, scores in (model.get("tasks") or {}).items():
        if "categories" in scores:
            add(f"{task} acc", scores.get("acc"), ((sinks.get("tasks") or {}).get(task) or {}).get("acc"),
                "higher", True)
    window = sinks.get("window")
    if window and "loss_by_position" in model and "loss_by_position" in sinks:
        add(f"loss at positions >= {2 * window}", loss_beyond(model["loss_by_position"], 2 * window),
            loss_beyond(sinks["loss_by_position"], 2 * window), "lower", True)
    for task, scores in (model.get("retrieval") or {}).items():
        add(f"{task} mean accuracy", scores.get("mean"), ((sinks.get("retrieval") or {}).get(task) or {}).get("mean"),
            "higher", False)
    return found


def verdict_lines(result: Mapping) -> list[str]:
    """Plain sentences: each measure, then whether the linearized model failed against window + sinks."""
    found = comparisons(result)
    if not found:
        return []
    lines = [f"{c['measure']}: linearized {c['linearized']:.4f} vs window+sinks {c['sinks']:.4f} "
             f"({c['better']} is better): {'beats it' if c['beats'] else 'does NOT beat it'}" for c in found]
    failed = [c["measure"] for c in found if c["required"] and not c["beats"]]
    required = [c for c in found if c["required"]]
    if failed:
        lines.append("FAILED: the linearized model does not beat the training-free window+sinks baseline on "
                     + ", ".join(failed) + ".")
    elif required:
        lines.append("PASSED: the linearized model beats the training-free window+sinks baseline on "
                     + ", ".join(c["measure"] for c in required) + ".")
    return lines
