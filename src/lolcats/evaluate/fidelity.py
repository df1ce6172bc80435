"""How closely a linearized model follows its teacher on held-out text: per-layer attention error and the
KL divergence of next-token distributions.

The work is bounded whatever the text's length: only the first ``max_tokens`` tokens are used, cut into
windows of at most ``seq_len`` tokens (so no attention, exact or linearized, ever sees a longer sequence),
and windows of equal length are scored together, a few per forward, so that the fixed cost of each forward
(thousands of small ops through the linearized layers) is paid a few times rather than three times per window.
"""

from __future__ import annotations

import torch

from ..convert import linearized_layers, set_attention_mode
from .scoring import encode, rows_per_forward


def text_windows(tokenizer, text: str, *, seq_len: int, max_tokens: int) -> list[list[int]]:
    """BOS + consecutive windows of the text's tokens, at most ``max_tokens`` tokens in all."""
    ids = encode(tokenizer, text)[:max_tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids), step) if len(ids[i:i + step]) > 1]


def _batches(model, windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Windows grouped by length (no padding), at most ``batch_size`` per group and within the logit budget
    (a large vocabulary, such as Gemma's 262k, then runs one window at a time)."""
    batches = []
    for length in sorted({len(w) for w in windows}, reverse=True):
        same = [w for w in windows if len(w) == length]
        rows = rows_per_forward(model, length, batch_size)
        batches += [same[i:i + rows] for i in range(0, len(same), rows)]
    return batches


@torch.no_grad()
def fidelity(student, teacher, windows: list[list[int]], *, batch_size: int = 8) -> dict:
    """``{"kl": mean KL(teacher ‖ student) per predicted token, "layers": [{"layer", "attention_mse"}]}``.

    attention_mse is stage 1's quantity: the mean squared error of each linearized layer's per-head output
    against exact softmax attention on the same q/k/v (before o_proj), with teacher inputs downstream.
    Windows of equal length run ``batch_size`` at a time; the results equal one window at a time up to
    float rounding (each window's mean error is weighted by its predicted tokens either way).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(student.parameters()).device
    layers = list(linearized_layers(student))
    errors = {layer.layer_idx: 0.0 for layer in layers}
    kl_total, predicted = 0.0, 0
    for batch in _batches(student, windows, batch_size):
        ids = torch.tensor(batch, device=device)
        rows, length = ids.shape
        set_attention_mode(student, "distill")
        try:
            student.get_decoder()(input_ids=ids, use_cache=False)
            for layer in layers:
                # distill_loss is the mean over the batch's positions: rows × per-window means of equal length.
                errors[layer.layer_idx] += float(layer.distill_loss) * rows * (length - 1)
        finally:
            set_attention_mode(student, "linear")
        student_log_probs = torch.log_softmax(student(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        teacher_log_probs = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        kl_total += float(torch.nn.functional.kl_div(student_log_probs, teacher_log_probs, log_target=True,
                                                     reduction="sum"))
        del student_log_probs, teacher_log_probs
        predicted += rows * (length - 1)
    return {
        "kl": kl_total / max(predicted, 1),
        "tokens": predicted,
        "layers": [{"layer": i, "attention_mse": error / max(predicted, 1)} for i, error in errors.items()],
    }
