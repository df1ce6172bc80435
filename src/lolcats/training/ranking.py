"""Which layers to keep as softmax: what linearizing each layer alone costs.

Stage 1 trains every converted layer on the teacher's inputs (the teacher's output goes downstream), so after
one stage 1 of all of them each layer's φ and γ are what a stage 1 of that layer alone would give; the layers
share only the learning-rate schedule and the gradient-norm clipping. Each layer then runs as the student
while every other layer stays exact softmax, and is scored by

  kl       the mean KL(teacher ‖ model) of the next-token distribution per held-out token, in nats;
  passkey  optionally, a retrieval probe past the window: the mean negative log-likelihood of a passkey's
           tokens after a passkey prompt (teacher-forced, one forward; the prompt reaches past the window so
           the linear term must carry the key), and whether greedy decoding would read the key back
           (each of its tokens the argmax).

The layers whose linearization costs most are the ones to keep as softmax (``--softmax-layers auto:K``).
Ties are broken by layer index, so a ranking is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..convert import linearized_layers, set_attention_mode
from ..data import IGNORE_INDEX, make_batches
from ..evaluate.retrieval import retrieval_prompt
from ..next_token import final_hidden, next_token_loss_sum

RANK_BY = ("kl", "passkey")
PROBE_DEPTHS = (0.1, 0.3, 0.5, 0.7)


def held_out_batches(held: list, pad_id: int, *, batch_tokens: int, max_tokens: int) -> list:
    """Batches of the held-out examples, up to about ``max_tokens`` scored tokens (the same for every layer)."""
    batches, scored = [], 0
    for batch in make_batches(held, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
        if scored >= max_tokens:
            break
        batches.append(batch)
        scored += int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    if not batches:
        raise ValueError("ranking layers needs held-out examples; there are none")
    return batches


def passkey_probes(tokenizer, *, context: int, depths: Sequence[float] = PROBE_DEPTHS, seed: int = 0) -> list:
    """(input ids of prompt + " " + key, number of key tokens) for one passkey prompt per depth."""
    probes = []
    for depth in depths:
        prompt = retrieval_prompt(tokenizer, "passkey", context=context, depth=depth, seed=seed)
        prompt_ids = tokenizer(prompt.prompt)["input_ids"]
        ids = tokenizer(prompt.prompt + " " + prompt.answer)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the tokenizer merges the passkey into the prompt's last token; cannot probe it")
        probes.append((torch.tensor([ids]), len(ids) - len(prompt_ids)))
    return probes


@torch.no_grad()
def _probe_scores(model, probes, device) -> tuple[float, float]:
    """(mean NLL per key token, share of probes whose every key token is the argmax)."""
    nll, tokens, right = 0.0, 0, 0
    for ids, key_tokens in probes:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=key_tokens + 1).logits[0, :-1].float()
        targets = ids[0, -key_tokens:]
        log_probs = torch.log_softmax(logits, -1)
        nll -= float(log_probs.gather(1, targets[:, None]).sum())
        tokens += key_tokens
        right += bool((logits.argmax(-1) == targets).all())
    return nll / tokens, right / len(probes)


@torch.no_grad()
def layer_costs(model, batches: list, *, probes: list | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Per converted layer with a linear term: the cost of running it alone as the student (see module doc).

    Returns {"teacher": {...probe scores}, "layers": [{"layer", "kl", "passkey_nll", "passkey_acc"}, ...]}.
    Every layer is left in linear mode afterwards.
    """
    layers = [layer for layer in linearized_layers(model) if layer.use_linear]
    if not layers:
        raise ValueError("no converted layer has a linear term: there is nothing to rank")
    device = next(model.parameters()).device
    set_attention_mode(model, "softmax")
    try:
        teacher_hidden, scored_rows = [], []
        for batch in batches:
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            scored = batch.labels[:, 1:].to(device) != IGNORE_INDEX
            teacher_hidden.append(final_hidden(model, ids, mask)[:, :-1][scored])
            scored_rows.append(scored)
        result: dict = {"teacher": {}, "layers": []}
        if probes:
            nll, acc = _probe_scores(model, probes, device)
            result["teacher"] = {"passkey_nll": nll, "passkey_acc": acc}
        total = sum(int(rows.sum()) for rows in scored_rows)
        for layer in layers:
            layer.mode = "linear"
            kl = 0.0
            for batch, scored, teacher in zip(batches, scored_rows, teacher_hidden):
                hidden = final_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device))[:, :-1][scored]
                kl += float(next_token_loss_sum(model, hidden, teacher_hidden=teacher))
            # A teacher layer with a sliding window (Gemma 3's local layers under local_layers=linearize) kept as
            # softmax keeps that window: constant memory either way, so the choice costs no cache growth.
            row = {"layer": layer.layer_idx, "kl": kl / max(total, 1), "teacher_window": layer.teacher_window}
            if probes:
                row["passkey_nll"], row["passkey_acc"] = _probe_scores(model, probes, device)
            layer.mode = "softmax"
            result["layers"].append(row)
            echo(f"layer {layer.layer_idx:>3}: KL {row['kl']:.5f}"
                 + (f", passkey NLL {row['passkey_nll']:.3f} acc {row['passkey_acc']:.2f}" if probes else ""))
        result["tokens"] = total
        return result
    finally:
        set_attention_mode(model, "linear")


def rank(costs: dict, by: str = "kl") -> list[int]:
    """Layer indices, the costliest to linearize first (ties: the lower index first)."""
    if by not in RANK_BY:
        raise ValueError(f"unknown ranking {by!r}; expected one of {RANK_BY}")
    key = "kl" if by == "kl" else "passkey_nll"
    rows = costs["layers"]
    if any(key not in row for row in rows):
        raise ValueError(f"ranking by {by} needs the {key} of every layer (run the passkey probe)")
    return [row["layer"] for row in sorted(rows, key=lambda row: (-row[key], row["layer"]))]


def softmax_count(spec: float, candidates: int) -> int:
    """K of ``auto:K``: a count (K ≥ 1), or a fraction (0 < K < 1) of the candidate layers, rounded."""
    count = round(spec * candidates) if spec < 1 else int(spec)
    if count > candidates:
        raise ValueError(f"auto:{count} keeps more layers than the {candidates} converted ones")
    return count


def format_ranking(costs: dict, order: list[int]) -> str:
    """A plain table: rank, layer, KL and (with the probe) the passkey scores."""
    by_layer = {row["layer"]: row for row in costs["layers"]}
    probe = "passkey_nll" in costs["layers"][0]
    lines = ["rank  layer        KL" + ("   passkey NLL  acc" if probe else "")]
    for position, layer in enumerate(order, 1):
        row = by_layer[layer]
        window = row.get("teacher_window")
        lines.append(f"{position:>4}  {layer:>5}  {row['kl']:.6f}"
                     + (f"  {row['passkey_nll']:>12.3f}  {row['passkey_acc']:.2f}" if probe else "")
                     + (f"  (local: teacher window {window})" if window else ""))
    teacher = costs.get("teacher") or {}
    if teacher:
        lines.append(f"teacher passkey NLL {teacher['passkey_nll']:.3f}, acc {teacher['passkey_acc']:.2f}")
    return "\n".join(lines)
