"""Stage 2, LoRA: the feature maps and γ are frozen; low-rank adapters on the attention projections of
the converted layers train on next-token prediction (peft does the LoRA).

Two next-token losses: ``ce``, cross-entropy on the data's tokens (the LoLCATs recipe), and ``kl``, the
KL divergence from the teacher's next-token distribution (the same weights in softmax mode with the
adapters off). ``kl`` costs one more forward per step but learns the teacher rather than the data; on
self-distilled (sampled) data, ``ce`` drifts towards the sampler's sharper distribution. Both run the LM
head over chunks of positions (next_token.py), so memory does not grow with positions × vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..convert import set_attention_mode
from ..data import IGNORE_INDEX, Batch
from ..next_token import final_hidden, next_token_loss_sum
from . import distributed


def recompute_layers_in_backward(model: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing for stage 2 (transformers' own, non-reentrant): a step keeps only each decoder
    layer's input for backward and recomputes the layer there, so the activations kept grow with one layer
    rather than with depth. Measured on the reference model at 2,048 tokens: stage-2 step peak 2.6 → 1.3 GB.

    transformers checkpoints a layer only in training mode, so this also sets ``model.train(enable)``: our
    attention has no dropout and LoRA's is 0 by default, so training mode changes nothing else."""
    if enable:
        # activation_checkpointing_enable is the name from transformers 5.x on; 4.x calls it gradient_...
        turn_on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        turn_on({"use_reentrant": False})
    elif is_recomputing_layers(model):
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.train(enable)


def is_recomputing_layers(model: nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _scored(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L−1) bool: positions whose next token carries loss; and those next tokens (N,)."""
    labels = batch.labels[:, 1:].to(device)
    scored = labels != IGNORE_INDEX
    return scored, labels[scored]


def lm_loss_fn(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """Mean cross-entropy of the data's next tokens, over the vocabulary in chunks of positions
    (next_token.py): no (positions × vocabulary) logits. An FSDP-sharded model takes the model's own
    full-logits loss (its LM head is only gathered inside the model's forward)."""
    device = next(model.parameters()).device
    sharded = distributed.is_sharded(next(model.parameters()))

    def loss_fn(batch: Batch) -> torch.Tensor:
        set_attention_mode(model, "linear")
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        if sharded:
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=batch.labels.to(device),
                         use_cache=False).loss
        scored, targets = _scored(batch, device)
        hidden = final_hidden(model, input_ids, attention_mask)[:, :-1][scored]
        return next_token_loss_sum(model, hidden, targets) / max(targets.numel(), 1)

    loss_fn.count_tokens = scored_tokens
    return loss_fn


def scored_tokens(batch: Batch) -> int:
    """Positions whose next token carries loss: what the next-token losses average over."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def teacher_kl_loss_fn(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """Mean KL(teacher ‖ student) of the next-token distributions at the scored positions. The teacher is the
    same weights in softmax mode with the adapters off; both distributions are computed over the vocabulary
    in chunks of positions (next_token.py), exactly, without (positions × vocabulary) tensors."""
    device = next(model.parameters()).device
    adapters = [module for module in model.modules() if isinstance(module, LoraLayer)]
    sharded = distributed.is_sharded(next(model.parameters()))

    def hidden_or_logits(input_ids, attention_mask):
        if sharded:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return final_hidden(model, input_ids, attention_mask)

    def loss_fn(batch: Batch) -> torch.Tensor:
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        scored, _ = _scored(batch, device)
        with torch.no_grad():
            set_attention_mode(model, "softmax")
            for adapter in adapters:
                adapter.enable_adapters(False)
            try:
                teacher = hidden_or_logits(input_ids, attention_mask)[:, :-1][scored]
            finally:
                for adapter in adapters:
                    adapter.enable_adapters(True)
                set_attention_mode(model, "linear")
        student = hidden_or_logits(input_ids, attention_mask)[:, :-1][scored]
        if sharded:
            teacher, student = torch.log_softmax(teacher.float(), -1), torch.log_softmax(student.float(), -1)
            return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return next_token_loss_sum(model, student, teacher_hidden=teacher) / max(student.shape[0], 1)

    loss_fn.count_tokens = scored_tokens
    return loss_fn
