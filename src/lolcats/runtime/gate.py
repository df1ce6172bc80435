"""The decay gate of the linear term (``gate: scalar``): per head, a data-dependent forgetting rate.

a_t = α_h · log σ(w_h · x_t + b_h) ≤ 0 from the layer's input x_t, so g_t = exp(a_t) ∈ (0, 1] multiplies the
linear state at every token (S_t = g_t S_{t−1} + φ(k_t) v_tᵀ; the ops weigh each linear term by
exp(Σ_{u=j+1..i} a_u)). A scalar sigmoid gate per head is what Lizard found best against Mamba-2- and GLA-style
gates. α starts at 0, so a new gate forgets nothing and the converted model is exactly today's; b starts at
logit(0.999), so the first steps of α open a slow forgetting (half-life ≈ 700 tokens at α = 1) that w then makes
data-dependent. α is used as max(α, 0): a gate can only forget. Weights stay fp32 in bf16 models, like φ and γ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .feature_maps import fp32_preserving

INITIAL_DECAY = 0.999  # σ(b) at initialisation: the per-token decay α = 1 would give


class DecayGate(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        # fp32 whatever the default dtype (transformers builds bf16 models under a bf16 default).
        self.proj = nn.Linear(hidden_size, num_heads, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, math.log(INITIAL_DECAY / (1 - INITIAL_DECAY)))
        self.scale = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        return super()._apply(fp32_preserving(fn), recurse)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> log-decay a (B, H, L) fp32, ≤ 0."""
        logits = self.proj(hidden_states.float())
        return (self.scale.clamp(min=0) * F.logsigmoid(logits)).transpose(1, 2)
