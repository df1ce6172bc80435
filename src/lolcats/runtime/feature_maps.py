"""Feature maps φ for linear attention, one set of weights per query head, applied after RoPE.

Every map takes (B, H, L, D) queries, or (B, Hkv, L, D) keys of grouped-query attention (each kv head
read by the H/Hkv query heads that share it, without repeating the keys), and returns non-negative-kernel
features (B, H, L, F) in fp32. Their weights stay fp32 inside bf16/fp16 models: ``model.to(torch.bfloat16)``
moves them to the new device but keeps their dtype (see ``FeatureMap._apply``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _identity_per_head(num_heads: int, rows: int, cols: int) -> torch.Tensor:
    """(H, rows, cols) fp32 identity, truncated or zero-padded when rows != cols.

    The dtype is explicit: transformers builds models under a default dtype of bf16 when asked for bf16.
    """
    return torch.eye(rows, cols, dtype=torch.float32).expand(num_heads, rows, cols).clone()


def fp32_preserving(fn):
    """Wrap an ``nn.Module._apply`` function so that it leaves fp32 tensors fp32 where it would halve them.

    ``Module.to(dtype)``/``.half()``/``.bfloat16()`` go through ``_apply``; the learned φ and γ must stay
    fp32 (their updates are far below bf16's resolution), so a half-precision cast only moves them to the
    cast's device. Casts to fp64 (gradient checks) apply as usual.
    """

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        converted = fn(tensor)
        if tensor.dtype == torch.float32 and converted.dtype in (torch.bfloat16, torch.float16):
            return tensor.to(device=converted.device)
        return converted

    return convert


class FeatureMap(nn.Module):
    """Base class: ``output_dim`` features per head."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, scaling: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        return super()._apply(fp32_preserving(fn), recurse)

    def _groups(self, x: torch.Tensor) -> int:
        """How many query heads read each of x's heads: 1 for queries, H/Hkv for grouped keys."""
        heads = x.shape[1]
        if heads < 1 or self.num_heads % heads:
            raise ValueError(f"feature map built for {self.num_heads} heads got {heads}")
        return self.num_heads // heads

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (B, H or Hkv, L, D) @ per-query-head weight (H, D, F) -> (B, H, L, F) in fp32."""
        groups = self._groups(x)
        compute = torch.promote_types(weight.dtype, torch.float32)
        x, weight = x.to(compute), weight.to(compute)
        if groups == 1:
            return torch.einsum("bhld,hdf->bhlf", x, weight)
        grouped = weight.view(x.shape[1], groups, *weight.shape[1:])
        return torch.einsum("bkld,kgdf->bkglf", x, grouped).flatten(1, 2)

    def _per_query_head(self, features: torch.Tensor) -> torch.Tensor:
        """Parameter-free maps compute on the kv heads once and share the result with their query heads."""
        groups = self._groups(features)
        if groups == 1:
            return features
        batch, heads = features.shape[:2]
        return features[:, :, None].expand(batch, heads, groups, *features.shape[2:]).flatten(1, 2)


class Hedgehog(FeatureMap):
    """φ(x) = [softmax(xW), softmax(−xW)] over the feature dim (Zhang et al., 2024): 2·feature_dim features."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, scaling: float) -> None:
        super().__init__(num_heads, head_dim, feature_dim, scaling)
        self.weight = nn.Parameter(_identity_per_head(num_heads, head_dim, feature_dim))

    @property
    def output_dim(self) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self._project(x, self.weight)
        return torch.cat([torch.softmax(projected, dim=-1), torch.softmax(-projected, dim=-1)], dim=-1)


class T2R(FeatureMap):
    """φ(x) = relu(xW + b) (Kasai et al., 2021), W initialised to the identity and b to zero."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, scaling: float) -> None:
        super().__init__(num_heads, head_dim, feature_dim, scaling)
        self.weight = nn.Parameter(_identity_per_head(num_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim, dtype=torch.float32))

    @property
    def output_dim(self) -> int:
        return self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self._project(x, self.weight) + self.bias)


class EluPlusOne(FeatureMap):
    """φ(x) = 1 + elu(x) (Katharopoulos et al., 2020); no parameters."""

    @property
    def output_dim(self) -> int:
        return self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_query_head(1 + F.elu(x.float()))


class Relu(FeatureMap):
    """φ(x) = relu(x); no parameters. Queries whose features all vanish attend to nothing (output 0)."""

    @property
    def output_dim(self) -> int:
        return self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_query_head(F.relu(x.float()))


class Taylor(FeatureMap):
    """Second-order Taylor features of exp(scaling·q·k) (as in Based), after a learned projection to r ≤ 16 dims.

    φ(q)·φ(k) = 1 + s(q'·k') + s²(q'·k')²/2 with q' = qP, always > 0; 1 + r + r² features, so the
    projection (identity-initialised, truncated) keeps large heads tractable.
    """

    max_rank = 16

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, scaling: float) -> None:
        super().__init__(num_heads, head_dim, feature_dim, scaling)
        rank = min(self.max_rank, head_dim, feature_dim)
        self.weight = nn.Parameter(_identity_per_head(num_heads, head_dim, rank))
        self.scaling = scaling

    @property
    def output_dim(self) -> int:
        rank = self.weight.shape[-1]
        return 1 + rank + rank * rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self._project(x, self.weight)
        ones = torch.ones_like(projected[..., :1])
        first = projected * math.sqrt(self.scaling)
        second = (projected.unsqueeze(-1) * projected.unsqueeze(-2)).flatten(-2) * (self.scaling / math.sqrt(2))
        return torch.cat([ones, first, second], dim=-1)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "hedgehog": Hedgehog,
    "t2r": T2R,
    "elu": EluPlusOne,
    "relu": Relu,
    "taylor": Taylor,
}


def make_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int, scaling: float) -> FeatureMap:
    try:
        cls = FEATURE_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}") from None
    return cls(num_heads, head_dim, feature_dim, scaling)
