"""How closely a linearized model follows its teacher on held-out text: per-layer attention error and the
KL divergence of next-token distributions."""

from __future__ import annotations

import torch

from ..convert import linearized_layers, set_attention_mode


def text_windows(tokenizer, text: str, *, seq_len: int, max_tokens: int) -> list[list[int]]:
    """BOS + consecutive windows of the text's tokens, at most ``max_tokens`` tokens in all."""
    from .scoring import encode

    ids = encode(tokenizer, text)[:max_tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids), step) if len(ids[i:i + step]) > 1]


@torch.no_grad()
def fidelity(student, teacher, windows: list[list[int]]) -> dict:
    """``{"kl": mean KL(teacher ‖ student) per predicted token, "layers": [{"layer", "attention_mse"}]}``.

    attention_mse is stage 1's quantity: the mean squared error of each linearized layer's per-head output
    against exact softmax attention on the same q/k/v (before o_proj), with teacher inputs downstream.
    """
    device = next(student.parameters()).device
    layers = list(linearized_layers(student))
    errors = {layer.layer_idx: 0.0 for layer in layers}
    kl_total, predicted = 0.0, 0
    for window in windows:
        ids = torch.tensor([window], device=device)
        set_attention_mode(student, "distill")
        try:
            student.get_decoder()(input_ids=ids, use_cache=False)
            for layer in layers:
                errors[layer.layer_idx] += float(layer.distill_loss) * (len(window) - 1)
        finally:
            set_attention_mode(student, "linear")
        student_log_probs = torch.log_softmax(student(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        teacher_log_probs = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        kl_total += float(torch.nn.functional.kl_div(student_log_probs, teacher_log_probs, log_target=True,
                                                     reduction="sum"))
        predicted += len(window) - 1
    return {
        "kl": kl_total / max(predicted, 1),
        "tokens": predicted,
        "layers": [{"layer": i, "attention_mse": error / max(predicted, 1)} for i, error in errors.items()],
    }
