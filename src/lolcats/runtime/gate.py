"""The decay gate of the linear term (``gate: scalar``): per head, a data-dependent forgetting rate.

From the layer's input x_t, r_t = σ(w_h · x_t + b_h)^α_h ∈ (0, 1] and the per-token decay is
g_t = 1 − (1 − r_t) / MIN_HORIZON ∈ [1 − 1/MIN_HORIZON, 1]; it multiplies the linear state at every token
(S_t = g_t S_{t−1} + φ(k_t) v_tᵀ; the ops weigh each linear term by exp(Σ_{u=j+1..i} a_u), a_t = log g_t). A
scalar sigmoid gate per head is what Lizard found best against Mamba-2- and GLA-style gates. α starts at 0, so a
new gate forgets nothing and the converted model is exactly today's; b starts at logit(0.999). α is used as
max(α, 0): a gate can only forget. Weights stay fp32 in bf16 models, like φ and γ.

Why the floor: the linear term's keys are at least a window old. An unbounded gate can shut (g ≈ 0) within a few
steps of stage 1, when the untrained φ makes the linear term a nuisance; the student is then the window alone,
exp(Σa) ≈ 0 leaves no gradient to φ or to the gate, and training is stuck there (measured on stories260k at the
recipe's LR: held-out loss frozen at the window's from step 25 on). With the floor the state keeps a horizon of at
least MIN_HORIZON tokens (a key 64 tokens past the window keeps ≥ e⁻¹ of its weight), so the linear term always
learns, and it can still forget everything older than a few horizons.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .feature_maps import fp32_preserving

INITIAL_DECAY = 0.999  # σ(b) at initialisation
MIN_HORIZON = 64.0  # the most a gate forgets per token is 1 / MIN_HORIZON of the state


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
        """(B, L, hidden) -> log-decay a (B, H, L) fp32, in [log(1 − 1/MIN_HORIZON), 0]."""
        log_r = self.scale.clamp(min=0) * F.logsigmoid(self.proj(hidden_states.float()))
        return torch.log1p(torch.expm1(log_r) / MIN_HORIZON).transpose(1, 2)
