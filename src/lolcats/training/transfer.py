"""Stage 1, attention transfer: only the feature maps (and γ) train, so that every converted layer's
output matches its own softmax teacher's, computed from the same (teacher) inputs.

The loss is the per-layer MSE of per-head outputs before o_proj, averaged over layers and scaled by
``mse_scale`` (LoLCATs uses 1000), plus optionally ``attention_ce`` × the cross-entropy of attention
weights (quadratic memory in sequence length). The decoder runs only up to the last converted layer:
layers above it, the final norm and the LM head cannot change the loss.

Because the teacher's output goes downstream, a layer's loss depends on its own φ and γ only. So each
layer's gradient is taken as soon as that layer has run and its graph is freed: a training step keeps the
activations of one layer for backward, not of all of them (the step's memory does not grow with depth).
The returned loss carries those gradients (``_LayerGradients``): ``loss.backward()`` scaled by any factor
adds factor × gradient to each parameter, exactly as a backward through the whole graph would, so the
training loop, micro-batches and DDP see an ordinary loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..convert import linearized_layers, set_attention_mode
from ..runtime import LinearizedAttention
from ..data import Batch


class _StopForward(Exception):
    pass


def _stop(module, args, output):
    raise _StopForward


class _LayerGradients(torch.autograd.Function):
    """A loss whose gradients were computed already: backward hands grad_output × each stored gradient to
    its parameter (through autograd, so DDP's reduction hooks fire as usual)."""

    @staticmethod
    def forward(ctx, value, gradients, *parameters):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(grad_output * gradient for gradient in ctx.gradients))


TRANSFER_PREFIXES = ("feature_map_q.", "feature_map_k.", "decay_gate.")  # and the γ logit, window_logit


def _is_transfer_parameter(name: str) -> bool:
    return name.startswith(TRANSFER_PREFIXES) or name == "window_logit"


def _layer_parameters(layer: LinearizedAttention) -> list[nn.Parameter]:
    return [p for name, p in layer.named_parameters() if _is_transfer_parameter(name)]


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Feature maps, decay gates and γ logits of converted layers that have a linear term (nothing else trains)."""
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearizedAttention) and module.use_linear:
            for pname, p in module.named_parameters():
                if _is_transfer_parameter(pname):
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

    def layer_loss(layer: LinearizedAttention) -> torch.Tensor:
        """This layer's share of the step's loss (the mean over layers is a sum of these)."""
        loss = mse_scale * layer.distill_loss
        if attention_ce > 0:
            loss = loss + attention_ce * layer.attention_ce
        return loss / len(layers)

    parameters = [p for layer in layers for p in _layer_parameters(layer)]
    gradients: dict[nn.Parameter, torch.Tensor] = {}

    def take_gradient(layer, args, output):
        trained = [p for p in _layer_parameters(layer) if p.requires_grad]
        loss = layer_loss(layer)
        if trained and loss.requires_grad:
            for p, grad in zip(trained, torch.autograd.grad(loss, trained, allow_unused=True)):
                gradients[p] = torch.zeros_like(p) if grad is None else grad
        layer.distill_loss = layer.distill_loss.detach()
        if layer.attention_ce is not None:
            layer.attention_ce = layer.attention_ce.detach()

    def loss_fn(batch: Batch) -> torch.Tensor:
        set_attention_mode(model, "distill")
        gradients.clear()
        handles = [layer.register_forward_hook(take_gradient) for layer in layers] if torch.is_grad_enabled() else []
        handles.append(layers[-1].register_forward_hook(_stop))
        inputs = decoder_inputs(batch, device, dtype) if decoder_inputs else {"input_ids": batch.input_ids.to(device)}
        try:
            decoder(**inputs, attention_mask=batch.attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        loss = torch.stack([layer_loss(layer) for layer in layers]).sum()
        if not gradients:
            return loss
        trained = [p for p in parameters if p in gradients]
        return _LayerGradients.apply(loss.detach(), [gradients.pop(p) for p in trained], *trained)

    return loss_fn
