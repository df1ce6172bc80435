"""Swap a model's attention layers for linearized ones, in place."""

from __future__ import annotations

import torch
from torch import nn

from .config import LinearizeConfig
from .swap import linearized_layers, set_attention_mode, swap_attention

__all__ = ["convert", "linearized_layers", "set_attention_mode", "trainable_parameters"]


def convert(model: nn.Module, config: LinearizeConfig | None = None, **overrides) -> nn.Module:
    """Linearize ``model`` in place and return it.

    Every base parameter is frozen; only the new feature maps and γ logits are trainable. Layers listed
    in ``config.softmax_layers`` (and, with ``local_layers="keep"``, a family's local sliding-window
    layers) are left untouched. Converted layers start in linear (student) mode, ready for inference.
    """
    if config is None:
        config = LinearizeConfig(**overrides)
    elif overrides:
        config = config.model_copy(update=overrides)
        config = LinearizeConfig.model_validate(config.model_dump())
    if getattr(model, "lolcats_config", None) is not None:
        raise ValueError("this model is already linearized")
    return swap_attention(model, config)


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
