"""Model surgery, in place: swap a model's attention layers for linearized ones (``convert``), and add or
merge the LoRA adapters of stage 2 (peft does the LoRA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import LinearizeConfig
from .runtime import LinearizedAttention, linearized_layers, set_attention_mode, swap_attention

__all__ = ["add_lora", "convert", "linearized_layers", "lora_parameters", "merge_lora", "set_attention_mode",
           "trainable_parameters"]


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


def lora_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module names of ``targets`` (e.g. q_proj) inside converted layers."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LinearizedAttention):
            for target in targets:
                if not isinstance(getattr(module, target, None), nn.Linear):
                    raise ValueError(f"LoRA target {target!r} is not a linear layer of {name}")
                names.append(f"{name}.{target}")
    return names


def add_lora(model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0) -> dict:
    """Inject LoRA adapters in place (no wrapper model); returns the settings needed to rebuild them."""
    modules = lora_target_modules(model, targets)
    if not modules:
        raise ValueError("the model has no converted layers to put LoRA on")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none")
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def merge_lora(model: nn.Module, merge: bool = True) -> None:
    """Fold every LoRA adapter into its base weight (``merge=False``: drop it) and put the plain linear layer back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
