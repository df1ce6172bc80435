"""Pieces shared by the three implementations of hybrid attention.

Shapes used throughout ``lolcats.ops``:
  q      (B, H,   L, D)   queries after RoPE (and q-norm), one per query head
  k      (B, Hkv, L, D)   keys after RoPE; Hkv divides H (grouped-query attention)
  v      (B, Hkv, L, Dv)
  fq, fk (B, H,   L, F)   feature maps of q and of the keys repeated to the H query heads
  start  (B,)             index of each row's first real token (left padding); tokens before it are
                          neither keys nor meaningful queries, and their outputs are zero

Hybrid attention of a query at relative position i (counted from its row's first real token):

  num_i = γ Σ_{j ∈ W(i)} exp(s_ij − m_i) v_j  +  Σ_{j ∈ Lin(i)} φ(q_i)·φ(k_j) v_j
  den_i = γ Σ_{j ∈ W(i)} exp(s_ij − m_i)      +  Σ_{j ∈ Lin(i)} φ(q_i)·φ(k_j)
  out_i = num_i / den_i

with s_ij = scaling · q_i·k_j, W(i) the causal softmax window and Lin(i) every older real key. With a decay
gate (``log_decay`` a_t ≤ 0 per head and position, Lizard / GLA style), each linear term is weighted by the
decay between key and query, exp(Σ_{t=j+1..i} a_t): the linear state forgets, S_t = g_t S_{t−1} + φ(k_t) v_tᵀ
with g_t = exp(a_t); the softmax terms are not decayed. a_t of padding positions is ignored (taken as 0). With
``sinks`` N > 0, W(i) also holds the row's first N real tokens (attention sinks, StreamingLLM / Lizard): they
are exact softmax terms for every query and never enter the linear term.

The max-subtraction m_i = max_{j ∈ W(i)} s_ij is taken over the window only, as LoLCATs does. It is not
a neutral stabiliser: it fixes the scale of the softmax terms (the largest is exactly γ) against the
linear terms, so every mode must use the same m_i, and the recurrent mode can, because it keeps the
window's keys. Because W(i) always holds key i itself, den_i ≥ γ > 0 whenever there is a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

WindowKind = Literal["none", "terrace", "sliding"]


@dataclass(frozen=True)
class Window:
    """Which keys a query attends to by softmax.

    ``terrace``: LoLCATs' blocks of ``size`` tokens counted from the row's first real token; a query in
    block b sees all of block b−1 and the causal part of block b (between size+1 and 2·size keys).
    ``sliding``: the last ``size`` tokens, the query's own included (HF's sliding-window convention).
    ``none``: no softmax window (pure linear attention).
    ``sinks``: the first ``sinks`` real tokens of each row are in every query's window as well (attention
    sinks); ``lookback`` and ``chunk_lookback`` describe the recent part only, which the sinks do not move.
    """

    kind: WindowKind = "terrace"
    size: int = 64
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "terrace", "sliding"):
            raise ValueError(f"unknown window kind {self.kind!r}; expected 'none', 'terrace' or 'sliding'")
        if self.kind != "none" and self.size < 1:
            raise ValueError(f"a {self.kind} window needs size >= 1, got {self.size}")
        if self.sinks < 0 or (self.sinks and self.kind == "none"):
            raise ValueError(f"sinks must be >= 0 and need a softmax window, got {self.sinks} with {self.kind!r}")

    @classmethod
    def of_attention(cls, attention: str, size: int, sinks: int = 0) -> "Window":
        """The softmax window of a layer converted with ``attention`` (LinearizeConfig.attention)."""
        return {"lolcats": cls("terrace", size, sinks), "sliding": cls("sliding", size, sinks), "linear": cls("none"),
                "window": cls("terrace", size, sinks)}[attention]

    @property
    def first_linear_query(self) -> int:
        """The first relative query position with a key outside its window and its sinks (a linear term, where the
        attention has one): rows of at most this many tokens never use it."""
        if self.kind == "terrace":  # block b sees blocks b−1 and b; the keys before them from position `sinks` on
            return (self.sinks // self.size + 2) * self.size
        if self.kind == "sliding":
            return self.size + self.sinks
        return 0

    @property
    def lookback(self) -> int:
        """Largest distance i − j of a key j inside the window of query i (−1 when there is no window)."""
        if self.kind == "terrace":
            return 2 * self.size - 1
        if self.kind == "sliding":
            return self.size - 1
        return -1

    def chunk_lookback(self, chunk: int) -> int:
        """Largest distance from a chunk's first position back to a key in the window of any query in
        that chunk, for chunks of ``chunk`` tokens starting at multiples of ``chunk`` (relative positions).

        A terrace query's window starts at its block's start minus ``size``; over chunk starts s that
        distance is (s mod size) + size, at most 2·size − gcd(chunk, size). With chunk == size that is one
        chunk, so the local slice is exactly the two blocks the terrace covers.
        """
        if self.kind == "terrace":
            return 2 * self.size - math.gcd(chunk, self.size)
        if self.kind == "sliding":
            return self.size - 1
        return 0

    def contains(self, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        """Whether key position pos_k lies in the window of query position pos_q (both relative, causal):
        the recent part (``contains_recent``) or a sink."""
        recent = self.contains_recent(pos_q, pos_k)
        return recent | (pos_k < self.sinks) if self.sinks else recent

    def contains_recent(self, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        """Whether pos_k lies in the recent part of pos_q's window (sinks aside)."""
        if self.kind == "terrace":
            return torch.div(pos_k, self.size, rounding_mode="floor") >= (
                torch.div(pos_q, self.size, rounding_mode="floor") - 1
            )
        if self.kind == "sliding":
            return pos_q - pos_k < self.size
        return torch.zeros(torch.broadcast_shapes(pos_q.shape, pos_k.shape), dtype=torch.bool, device=pos_q.device)


def expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat (B, Hkv, ...) to (B, H, ...) so that query head h reads kv head h // (H // Hkv)."""
    num_kv_heads = x.shape[1]
    if num_kv_heads == num_heads:
        return x
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads evenly")
    groups = num_heads // num_kv_heads
    return x[:, :, None].expand(x.shape[0], num_kv_heads, groups, *x.shape[2:]).reshape(
        x.shape[0], num_heads, *x.shape[2:]
    )


def row_starts(start: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if start is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    start = torch.as_tensor(start, dtype=torch.long, device=device)
    if start.shape != (batch,):
        raise ValueError(f"start must have shape ({batch},), got {tuple(start.shape)}")
    return start


def shift_rows(x: torch.Tensor | None, starts: torch.Tensor) -> torch.Tensor | None:
    """Move each row's real tokens to the front: out[b, :, t] = x[b, :, t + starts[b]].

    The positions freed at the end repeat the last token; they come after every real token, so causal
    attention never shows them to a real query, and their own outputs are dropped by unshift_rows.
    """
    if x is None:
        return None
    length = x.shape[2]
    index = (torch.arange(length, device=x.device)[None, :] + starts[:, None]).clamp(max=length - 1)
    return x.gather(2, index[:, None, :, None].expand(x.shape[0], x.shape[1], length, x.shape[3]))


def unshift_rows(x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Inverse of shift_rows, with zeros at the padding positions."""
    length = x.shape[2]
    positions = torch.arange(length, device=x.device)[None, :] - starts[:, None]
    index = positions.clamp(min=0)[:, None, :, None].expand(x.shape[0], x.shape[1], length, x.shape[3])
    return x.gather(2, index) * (positions >= 0)[:, None, :, None]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (for gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gamma_per_head(
    gamma: torch.Tensor | None, num_heads: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """γ as an (H, 1, 1) tensor; None means 1 (no re-weighting of the softmax terms)."""
    if gamma is None:
        return torch.ones(num_heads, 1, 1, device=device, dtype=dtype)
    if gamma.shape != (num_heads,):
        raise ValueError(f"gamma must have shape ({num_heads},), got {tuple(gamma.shape)}")
    return gamma.to(dtype).view(num_heads, 1, 1)


def softmax_terms(scores: torch.Tensor, in_window: torch.Tensor) -> torch.Tensor:
    """exp(s − m) on the window, 0 elsewhere, with m the row max over the window (0 for empty rows)."""
    scores = scores.masked_fill(~in_window, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.exp(scores - row_max)


def normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where nothing was attended to (padding queries; relu features that all vanish)."""
    return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)


def check_log_decay(log_decay: torch.Tensor | None, fq: torch.Tensor | None) -> None:
    """``log_decay`` must be (B, H, L) like φ(q) without its feature dim, and only goes with a linear term."""
    if log_decay is None:
        return
    if fq is None:
        raise ValueError("a decay gate (log_decay) acts on the linear term, and there is none")
    if log_decay.shape != fq.shape[:3]:
        raise ValueError(f"log_decay must be (B, H, L) = {tuple(fq.shape[:3])}, got {tuple(log_decay.shape)}")


def cumulative_log_decay(log_decay: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """A_t = Σ_{u ≤ t} a_u over each row's real positions, in float64 (B, H, L): A_i − A_j is then the log-decay
    between key j and query i without the cancellation an fp32 running sum would suffer over long rows."""
    positions = torch.arange(log_decay.shape[2], device=log_decay.device)
    real = (positions[None, :] >= start[:, None])[:, None, :]
    return torch.where(real, log_decay.double(), 0.0).cumsum(-1)


def check_inputs(q, k, v, fq, fk, window: Window, use_linear: bool) -> None:
    if window.kind == "none" and not use_linear:
        raise ValueError("attention with neither a softmax window nor a linear term attends to nothing")
    if window.kind != "none" and (q is None or k is None):
        raise ValueError("a softmax window needs q and k")
    if use_linear and (fq is None or fk is None):
        raise ValueError("the linear term needs the feature maps fq and fk")
    if v.dim() != 4:
        raise ValueError(f"v must be (B, Hkv, L, Dv), got shape {tuple(v.shape)}")
