"""One small adapter per model family, chosen by ``config.model_type``: where attention lives, how it makes
q, k and v (RoPE, q/k norm, grouped-query heads), the teacher's own window, and local/global layers.

A family overrides only what differs from the Llama-style defaults of ``AttentionFamily``. To add one:
subclass it below and list it in ``FAMILIES``."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE in the rotate-half layout; cos/sin (B, L, D) as the model's rotary embedding returns them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class AttentionFamily:
    """Llama-style defaults; a family overrides only what differs.

    Attention at ``model.get_decoder().layers[i].self_attn`` with q/k/v/o projections, RoPE in the
    rotate-half layout, grouped-query heads, and the module's own ``scaling`` and ``head_dim``.
    """

    name = "llama"
    model_types: tuple[str, ...] = ("llama",)
    qk_norm = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)

    @property
    def submodules(self) -> tuple[str, ...]:
        base = ("q_proj", "k_proj", "v_proj", "o_proj")
        return base + ("q_norm", "k_norm") if self.qk_norm else base

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_decoder().layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        layer.self_attn = module

    def teacher_window(self, attention: nn.Module) -> int | None:
        """The teacher's own sliding window for this layer (HF convention: the last `w` tokens), if any."""
        return getattr(attention, "sliding_window", None)

    def is_local_layer(self, model_config, layer_idx: int) -> bool:
        """Whether this layer is one of a local/global pattern's local layers (kept as-is by default)."""
        return False

    def check_supported(self, model_config) -> None:
        softcap = getattr(model_config, "attn_logit_softcapping", None)
        if softcap:
            raise ValueError(f"{self.name}: attention logit soft-capping ({softcap}) is not supported")

    def project(self, attention: nn.Module, hidden_states: torch.Tensor, position_embeddings, unrotated: bool = False):
        """q (B, H, L, D), k and v (B, Hkv, L, D) after q/k norm and RoPE, as the teacher computes them; with
        ``unrotated``, also q and k before RoPE (for feature maps of a linear term without positions)."""
        shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
        q = attention.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        cos, sin = position_embeddings
        rotated_q, rotated_k = apply_rotary(q, k, cos, sin)
        return (rotated_q, rotated_k, v, q, k) if unrotated else (rotated_q, rotated_k, v)


class Llama(AttentionFamily):
    name = "llama"
    model_types = ("llama",)


class Mistral(AttentionFamily):
    """Llama layout; a configured `sliding_window` is the teacher's window on every layer and is honoured."""

    name = "mistral"
    model_types = ("mistral",)

    def teacher_window(self, attention) -> int | None:
        return getattr(attention.config, "sliding_window", None)


class Qwen2(AttentionFamily):
    """Llama layout with biases on q/k/v (they live inside the projections, so nothing changes here)."""

    name = "qwen2"
    model_types = ("qwen2",)


class Qwen3(AttentionFamily):
    """Llama layout plus per-head RMSNorm on q and k before RoPE."""

    name = "qwen3"
    model_types = ("qwen3",)
    qk_norm = True


class Gemma3Text(AttentionFamily):
    """Gemma 3 text: q/k RMSNorm, scaling from query_pre_attn_scalar (the module's own `scaling`),
    and a local/global pattern: most layers are sliding-window softmax (512 tokens for 270M), every
    sixth is global.

    Local layers already run in constant memory, so by default they stay exactly as the teacher has
    them and only the global layers become hybrid (`local_layers="keep"`). With
    `local_layers="linearize"` they are converted too; their teacher (distillation target) remains the
    sliding-window softmax.
    """

    name = "gemma3_text"
    model_types = ("gemma3_text",)
    qk_norm = True

    def is_local_layer(self, model_config, layer_idx: int) -> bool:
        layer_types = getattr(model_config, "layer_types", None)
        return bool(layer_types) and layer_types[layer_idx] == "sliding_attention"


FAMILIES: dict[str, AttentionFamily] = {
    model_type: family() for family in (Llama, Mistral, Qwen2, Qwen3, Gemma3Text) for model_type in family.model_types
}


def family_for(model_config) -> AttentionFamily:
    model_type = getattr(model_config, "model_type", None)
    try:
        family = FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; lolcats supports: {', '.join(sorted(FAMILIES))}"
        ) from None
    family.check_supported(model_config)
    return family
