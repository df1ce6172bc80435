"""Stage 1, attention transfer: only the feature maps (and γ) train, so that every converted layer's
output matches its own softmax teacher's, computed from the same (teacher) inputs.

The loss is the per-layer MSE of per-head outputs before o_proj, averaged over layers and scaled by
``mse_scale`` (LoLCATs uses 1000), plus optionally ``attention_ce`` × the cross-entropy of attention
weights (quadratic memory in sequence length). The decoder runs only up to the last converted layer:
layers above it, the final norm and the LM head cannot change the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..attention import LinearizedAttention
from ..convert import linearized_layers, set_attention_mode
from ..data import Batch


class _StopForward(Exception):
    pass


def _stop(module, args, output):
    raise _StopForward


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Feature maps and γ logits of converted layers that have a linear term (nothing else trains)."""
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearizedAttention) and module.use_linear:
            for pname, p in module.named_parameters():
                if pname.startswith(("feature_map_q.", "feature_map_k.")) or pname == "window_logit":
                    params[f"{name}.{pname}"] = p
    return params


def transfer_loss_fn(
    model: nn.Module,
    *,
    mse_scale: float = 1000.0,
    attention_ce: float = 0.0,
    decoder_inputs: Callable[[Batch, torch.device, torch.dtype], dict] | None = None,
) -> Callable[[Batch], torch.Tensor]:
    """``decoder_inputs`` replaces the token ids by other decoder inputs (block-wise transfer feeds the stored
    hidden states as ``inputs_embeds``)."""
    layers = [layer for layer in linearized_layers(model) if layer.use_linear]
    if not layers:
        raise ValueError("no converted layer has a linear term: there is nothing for attention transfer to train")
    for layer in layers:
        layer.attention_ce_weight = attention_ce
    decoder = model.get_decoder()
    weight = layers[0].q_proj.weight
    device, dtype = weight.device, weight.dtype

    def loss_fn(batch: Batch) -> torch.Tensor:
        set_attention_mode(model, "distill")
        handle = layers[-1].register_forward_hook(_stop)
        inputs = decoder_inputs(batch, device, dtype) if decoder_inputs else {"input_ids": batch.input_ids.to(device)}
        try:
            decoder(**inputs, attention_mask=batch.attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        loss = mse_scale * torch.stack([layer.distill_loss for layer in layers]).mean()
        if attention_ce > 0:
            loss = loss + attention_ce * torch.stack([layer.attention_ce for layer in layers]).mean()
        return loss

    return loss_fn
