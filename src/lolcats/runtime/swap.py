"""Put LinearizedAttention into a model in place: the runtime half of ``convert``.

This file and what it imports (attention, cache, feature maps, families, ops) depend on torch and
transformers only: ``lolcats export`` copies them next to an exported model's code, so a folder
loads without lolcats installed. ``config`` is a LinearizeConfig, or any object with its fields.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from torch import nn

from .attention import MODES, AttentionMode, LinearizedAttention, PaddingContext
from .cache import LinearizedCache
from .families import family_for


def swap_attention(model: nn.Module, config) -> nn.Module:
    """Replace the attention of every layer to linearize (see ``convert``) and freeze the base."""
    family = family_for(model.config)
    layers = family.decoder_layers(model)
    out_of_range = [i for i in config.softmax_layers if i >= len(layers)]
    if out_of_range:
        raise ValueError(f"softmax_layers {out_of_range} out of range: the model has {len(layers)} layers")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    decoder = model.get_decoder()
    linearized: list[int] = []
    text_config = model.config.get_text_config(decoder=True)
    context = PaddingContext(
        cache_factory=lambda: LinearizedCache(text_config, linearized),
        cache_argument="cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values",
    )
    decoder.register_forward_pre_hook(context.capture, with_kwargs=True)

    for layer_idx, layer in enumerate(layers):
        if layer_idx in config.softmax_layers:
            continue
        if config.local_layers == "keep" and family.is_local_layer(model.config, layer_idx):
            continue
        original = family.attention(layer)
        module = LinearizedAttention(original, family, config, context, layer_idx)
        module.to(device=original.q_proj.weight.device)
        family.set_attention(layer, module)
        linearized.append(layer_idx)
    model.lolcats_config = config
    return model


def linearized_layers(model: nn.Module) -> Iterator[LinearizedAttention]:
    return (module for module in model.modules() if isinstance(module, LinearizedAttention))


def set_recall_cache(model: nn.Module, recall: int) -> None:
    """Give every linearized layer a sparse recall cache of ``recall`` keys per head (0: none), at inference."""
    layers = list(linearized_layers(model))
    if not layers:
        raise ValueError("a recall cache is for a linearized folder: a base model has no linear state")
    for layer in layers:
        layer.set_recall(recall)


def set_attention_mode(model: nn.Module, mode: AttentionMode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    for layer in linearized_layers(model):
        layer.mode = mode
        layer.distill_loss = None
