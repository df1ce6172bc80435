"""The module that stands in for a model's softmax attention.

It adopts the original layer's projections (and q/k norms) under their original names, so base
weights keep their state-dict keys, and adds a feature map per head for q and k plus a per-head
γ = sigmoid(window_logit). Three modes:

  softmax  the teacher: exact causal softmax (with the teacher's own sliding window, if any)
  linear   the student: hybrid softmax-window + linear attention (chunked, O(L) memory)
  distill  both from the same q/k/v; records the MSE of the per-head outputs before o_proj in
           ``distill_loss`` and passes the teacher's output downstream
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .feature_maps import fp32_preserving, make_feature_map
from .gate import DecayGate
from .ops_recall import check_recall, hybrid_attention_recall
from .cache import LinearizedCache, RecurrentLayer
from .families import AttentionFamily
from .ops import (
    Window,
    expand_heads,
    hybrid_attention_chunked,
    hybrid_attention_step,
    hybrid_attention_weights,
    recurrent_state_from_prefix,
    softmax_attention,
)

AttentionMode = Literal["softmax", "linear", "distill"]
MODES = ("softmax", "linear", "distill")


class PaddingContext:
    """What every linearized layer needs from the decoder's own arguments, captured once per forward.

    HF hands attention layers a 4D mask whose form depends on the attention implementation (or None);
    lolcats needs each row's first real token, so a forward pre-hook on the decoder keeps its 2D
    ``attention_mask``. The same hook makes generation work: it swaps the empty cache that
    ``generate()`` or ``use_cache=True`` creates for a ``LinearizedCache``, and gives left-padded rows
    position ids counted from their first real token (as ``generate()`` does), so a padded row is
    computed exactly as it would be alone.
    """

    def __init__(self, cache_factory=None, cache_argument: str = "cache") -> None:
        self.attention_mask: torch.Tensor | None = None
        self.cache_factory = cache_factory
        self.cache_argument = cache_argument
        self._starts: torch.Tensor | None = None
        self._new_tokens: tuple[int, torch.Tensor | None] | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.attention_mask = mask
        self._starts = None
        self._new_tokens = None
        if self.cache_factory is None:
            return None
        kwargs = dict(kwargs)
        if len(args) > 1:  # move a positional mask to kwargs so that position ids can follow by name
            kwargs["attention_mask"] = args[1]
            args = args[:1]
        self._provide_cache(module, kwargs)
        self._provide_position_ids(args, kwargs)
        return args, kwargs

    def _provide_cache(self, module: nn.Module, kwargs: dict) -> None:
        name = self.cache_argument
        cache = kwargs.get(name, kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        if isinstance(cache, LinearizedCache):
            return
        if cache is None and not use_cache:
            return
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"a linearized model cannot continue from a {type(cache).__name__} that already holds tokens; "
                "let the model create its cache (generate() does) or pass the cache it returned"
            )
        kwargs.pop("past_key_values", None)
        kwargs[name] = self.cache_factory()

    def _provide_position_ids(self, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is not None or mask is None or mask.dim() != 2 or bool(mask.all()):
            return
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        length = inputs.shape[1]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = positions[:, -length:]

    def row_starts(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Index of each row's first real token; rows must be padded on the left and/or right only."""
        if self._starts is not None:
            return self._starts
        mask = self.attention_mask
        if mask is None:
            starts = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            if mask.dim() != 2:
                raise ValueError(
                    f"linearized attention needs the 2D padding mask (batch, length); got a {mask.dim()}D mask"
                )
            if mask.shape != (batch, length):
                raise ValueError(
                    f"attention_mask covers {mask.shape[1]} positions for {length} new tokens, but the cache is "
                    "empty: pass the cache returned by the previous call"
                )
            real = mask.to(torch.bool)
            positions = torch.arange(length, device=device)
            starts = torch.where(real.any(1), real.to(torch.int8).argmax(1), torch.full_like(real[:, 0], length, dtype=torch.long))
            expected = (positions[None, :] >= starts[:, None]) & (positions[None, :] < (starts + real.sum(1))[:, None])
            if not torch.equal(expected, real):
                bad = int((expected != real).any(1).nonzero()[0])
                raise ValueError(
                    f"attention_mask row {bad} has padding between real tokens; linearized attention supports "
                    "left and right padding only"
                )
        self._starts = starts
        return starts

    def right_padded(self) -> bool:
        mask = self.attention_mask
        return mask is not None and mask.dim() == 2 and not bool(mask[:, -1].all())

    def new_token_mask(self, length: int) -> torch.Tensor | None:
        """(B, length) bool: which of the newest ``length`` columns are real tokens (None: all of them)."""
        if self._new_tokens is None or self._new_tokens[0] != length:
            mask = self.attention_mask
            real = None
            if mask is not None:
                if mask.dim() != 2:
                    raise ValueError(f"linearized attention needs the 2D padding mask; got a {mask.dim()}D mask")
                real = mask[:, -length:].to(torch.bool)
                if bool(real.all()):
                    real = None
            self._new_tokens = (length, real)
        return self._new_tokens[1]


class LinearizedAttention(nn.Module):
    def __init__(
        self,
        original: nn.Module,
        family: AttentionFamily,
        config,  # a LinearizeConfig, or any object with its fields
        context: PaddingContext,
        layer_idx: int,
    ) -> None:
        super().__init__()
        for name in family.submodules:
            setattr(self, name, getattr(original, name))
        # Plain attributes that decoder layers of some transformers versions read from their attention.
        for name in ("config", "is_causal", "is_sliding", "layer_type", "sliding_window"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.family = family
        self.layer_idx = layer_idx
        self.head_dim = original.head_dim
        self.scaling = float(original.scaling)
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.teacher_window = family.teacher_window(original)
        sinks = getattr(config, "sinks", 0)  # exports written before sinks existed have none
        if sinks and config.attention == "linear":
            raise ValueError("attention sinks are softmax terms: they need a window (attention 'lolcats', 'sliding' "
                             "or 'window'), not attention='linear'")
        self.window = Window.of_attention(config.attention, config.window, sinks)
        self.use_linear = config.attention != "window"
        self.chunk_size = config.chunk_size
        if self.use_linear:
            def feature_map():
                return make_feature_map(config.feature_map, self.num_heads, self.head_dim, config.feature_dim, self.scaling)

            self.feature_map_q = feature_map()
            self.feature_map_k = feature_map()
        gate = getattr(config, "gate", "none")  # exports written before gates existed have none
        if gate not in ("none", "scalar"):
            raise ValueError(f"unknown gate {gate!r}; expected 'none' or 'scalar'")
        if gate != "none" and not self.use_linear:
            raise ValueError("a decay gate acts on the linear term: attention='window' has none")
        self.decay_gate = DecayGate(self.q_proj.in_features, self.num_heads) if gate == "scalar" else None
        self.linear_rope = bool(getattr(config, "linear_rope", True))
        self.recall = 0
        self.set_recall(int(getattr(config, "recall_cache", 0)))
        gamma_logit = math.log(config.gamma_init / (1 - config.gamma_init))
        # fp32 whatever the default dtype (transformers builds bf16 models under a bf16 default).
        self.window_logit = nn.Parameter(torch.full((self.num_heads,), gamma_logit, dtype=torch.float32))
        self.mode: AttentionMode = "linear"
        self.distill_loss: torch.Tensor | None = None
        # Optional extra of distill mode; it materialises L×L attention weights (quadratic memory).
        self.attention_ce_weight = 0.0
        self.attention_ce: torch.Tensor | None = None
        # Diagnostic: per head, the mean attention mass on the linear term (from the chunked path, O(L) memory).
        self.record_linear_share = False
        self.linear_share: torch.Tensor | None = None
        self._context = context

    def _apply(self, fn, recurse=True):
        """Casts reach the frozen projections; γ's logit (like φ, see feature_maps) stays fp32 in a bf16 model."""
        logit, keep = self.window_logit, fp32_preserving(fn)
        return super()._apply(lambda tensor: keep(tensor) if tensor is logit else fn(tensor), recurse)

    @property
    def gamma(self) -> torch.Tensor:
        """Per-head weight of the softmax-window terms against the linear terms."""
        return torch.sigmoid(self.window_logit)

    def teacher(self, q, k, v, start) -> torch.Tensor:
        return softmax_attention(q, k, v, scaling=self.scaling, sliding_window=self.teacher_window, start=start)

    def features(self, q, k):
        """φ(q) (B, H, L, F) and φ(k) (B, H, L, F), each kv head's keys read by the query heads sharing it;
        (None, None) without a linear term."""
        if not self.use_linear:
            return None, None
        return self.feature_map_q(q), self.feature_map_k(k)

    def _window_covers(self, length: int) -> bool:
        """Whether every key of a ``length``-token sequence is inside the softmax window of every later query.

        Only used without autograd: in training the chunked path keeps φ and γ in the graph (with zero gradient).
        """
        if torch.is_grad_enabled():
            return False
        if self.window.kind == "terrace":
            return length <= 2 * self.window.size  # blocks 0 and 1 see everything before them
        return self.window.kind == "sliding" and length <= self.window.size

    def set_recall(self, recall: int) -> None:
        """Keys of the sparse recall cache per query head (0: none). Inference only: with autograd on, the layer
        computes without it, as it was trained."""
        check_recall(self.window, recall, self.use_linear)
        self.recall = recall

    def _recalling(self) -> bool:
        return bool(self.recall) and not torch.is_grad_enabled() and not self.record_linear_share

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The decay gate's a_t (B, H, L) fp32 for these inputs; None without a gate."""
        return None if self.decay_gate is None else self.decay_gate(hidden_states)

    def student(self, q, k, v, start, features=None, output_dtype=None, log_decay=None,
                feature_inputs=None) -> torch.Tensor:
        """``feature_inputs``: what φ reads, (q, k) before RoPE when ``linear_rope`` is off (default: q, k)."""
        if self._window_covers(q.shape[2]) and not self.record_linear_share:
            # No key is old enough for the linear term: the hybrid is exact causal softmax (γ cancels in
            # the normaliser), so short sequences (task scoring, short prompts) take the SDPA path.
            return softmax_attention(q, k, v, scaling=self.scaling, start=start)
        fq, fk = features if features is not None else self.features(*(feature_inputs or (q, k)))
        if self._recalling():
            return hybrid_attention_recall(q, k, v, fq, fk, window=self.window, recall=self.recall,
                                           scaling=self.scaling, gamma=self.gamma, start=start,
                                           output_dtype=output_dtype, log_decay=log_decay)
        attend = dict(window=self.window, scaling=self.scaling, gamma=self.gamma, use_linear=self.use_linear,
                      start=start, chunk_size=self.chunk_size, output_dtype=output_dtype, log_decay=log_decay)
        if not self.record_linear_share:
            return hybrid_attention_chunked(q, k, v, fq, fk, **attend)
        out, share = hybrid_attention_chunked(q, k, v, fq, fk, **attend, return_linear_share=True)
        self.linear_share = _mean_over_real_queries(share.detach(), start)
        return out

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        layer_cache = self._layer_cache(kwargs.get("cache", kwargs.get("past_key_values")))
        projected = self.family.project(self, hidden_states, position_embeddings, unrotated=not self.linear_rope)
        q, k, v = projected[:3]
        feature_inputs = projected[3:] or (q, k)  # what φ reads: q, k before RoPE without linear_rope
        if layer_cache is not None and layer_cache.state is not None:
            out = self._decode(q, k, v, layer_cache, self.log_decay(hidden_states), feature_inputs)
        elif self.mode == "linear":
            start = self._context.row_starts(batch, length, hidden_states.device)
            needed = layer_cache is not None or self.record_linear_share or not self._window_covers(length)
            features = self.features(*feature_inputs) if needed else (None, None)
            log_decay = self.log_decay(hidden_states) if needed else None
            recall_state = None
            if layer_cache is not None and self._recalling():
                # the pass that computes the outputs also reaches the cache and linear sums decoding continues from
                out, *recall_state = hybrid_attention_recall(
                    q, k, v, *features, window=self.window, recall=self.recall, scaling=self.scaling,
                    gamma=self.gamma, start=start, return_state=True, log_decay=log_decay)
            else:
                out = self.student(q, k, v, start, features, log_decay=log_decay)
            if layer_cache is not None:
                ring_feature_keys = self._ring_feature_keys(feature_inputs[1])
                self._prefill(layer_cache, k, v, features[1], start, log_decay, ring_feature_keys, recall_state)
        elif layer_cache is not None:
            raise ValueError(f"a cache is only filled in linear mode, not {self.mode!r}: call with use_cache=False")
        elif self.mode == "softmax":
            out = self.teacher(q, k, v, self._context.row_starts(batch, length, hidden_states.device))
        elif self.mode == "distill":
            start = self._context.row_starts(batch, length, hidden_states.device)
            with torch.no_grad():
                out = self.teacher(q, k, v, start)
            # fp32 student output: the loss compares it before any rounding to the model's dtype.
            log_decay = self.log_decay(hidden_states)
            predicted = self.student(q, k, v, start, output_dtype=torch.float32, log_decay=log_decay,
                                     feature_inputs=feature_inputs)
            self.distill_loss = _masked_mse(predicted, out, start)
            if self.attention_ce_weight > 0:
                self.attention_ce = self._attention_cross_entropy(q, k, start, log_decay, feature_inputs)
        else:
            raise ValueError(f"unknown attention mode {self.mode!r}; expected one of {MODES}")
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), None

    def _layer_cache(self, cache) -> RecurrentLayer | None:
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx] if isinstance(cache, LinearizedCache) else None
        if not isinstance(layer, RecurrentLayer):
            raise ValueError(
                f"linearized layer {self.layer_idx} got a {type(cache).__name__} without a recurrent state for it; "
                "use the cache the linearized model creates (generate() does this by itself)"
            )
        return layer

    def _ring_feature_keys(self, feature_k: torch.Tensor) -> torch.Tensor | None:
        """Keys before RoPE ride in a second ring of the cache when φ reads them: only a window whose leaving keys
        are folded into a linear term needs them (not the window alone, a training-free baseline)."""
        if self.linear_rope or self.window.kind == "none" or not self.use_linear:
            return None
        return feature_k

    def _key_features(self, keys: torch.Tensor) -> torch.Tensor:
        return self.feature_map_k(expand_heads(keys, self.num_heads))

    def _prefill(self, layer_cache: RecurrentLayer, k, v, fk, start, log_decay=None, feature_keys=None,
                 recall_state=None) -> None:
        if self._context.right_padded():
            raise ValueError("prompts for generation must be padded on the left (tokenizer.padding_side = 'left')")
        layer_cache.state = recurrent_state_from_prefix(
            k.detach(), v.detach(), None if fk is None else fk.detach(),
            window=self.window, num_heads=self.num_heads, start=start,
            log_decay=None if log_decay is None else log_decay.detach(),
            feature_keys=None if feature_keys is None else feature_keys.detach(),
            recall_state=recall_state,
        )

    @torch.no_grad()
    def _decode(self, q, k, v, layer_cache: RecurrentLayer, log_decay=None, feature_inputs=None) -> torch.Tensor:
        """New tokens after a filled cache, one step each (constant work per token)."""
        if self.mode != "linear":
            raise ValueError(f"decoding with a cache needs linear mode, not {self.mode!r}")
        state = layer_cache.state
        real = self._context.new_token_mask(q.shape[2])
        feature_q, feature_k = feature_inputs or (q, k)
        fq = self.feature_map_q(feature_q) if self.use_linear else None
        # With a window, φ(k) is only needed as keys leave it; without one, every key is folded at once.
        fk = self.feature_map_k(expand_heads(feature_k, self.num_heads)) if self.window.kind == "none" else None
        ring_feature_keys = self._ring_feature_keys(feature_k)
        if real is not None:
            # Checked once per forward, not per token (the steps themselves never synchronise with the host):
            # a padding token must come before every real token of its row, earlier calls included.
            seen_real = (state.lengths > 0)[:, None] | real.long().cummax(1).values.bool()
            if bool((~real & seen_real).any()):
                raise ValueError("attention_mask marks padding after a row's real tokens; pad on the left only")
        outputs = []
        for t in range(q.shape[2]):
            real_t = None if real is None else real[:, t]
            outputs.append(hybrid_attention_step(
                state, q[:, :, t], k[:, :, t], v[:, :, t],
                None if fq is None else fq[:, :, t], None if fk is None else fk[:, :, t], real_t,
                window=self.window, scaling=self.scaling, gamma=self.gamma, use_linear=self.use_linear,
                key_features=self._key_features if self.use_linear else None,
                log_decay=None if log_decay is None else log_decay[:, :, t],
                feature_key=None if ring_feature_keys is None else ring_feature_keys[:, :, t],
            ))
        return torch.stack(outputs, dim=2)

    def _student_weights(self, q, k, start, log_decay=None, feature_inputs=None):
        fq = fk = None
        if self.use_linear:
            fq, fk = self.features(*(feature_inputs or (q, k)))
        return hybrid_attention_weights(
            q, k, fq, fk, window=self.window, scaling=self.scaling, gamma=self.gamma,
            use_linear=self.use_linear, start=start, log_decay=log_decay,
        )

    def _attention_cross_entropy(self, q, k, start, log_decay=None, feature_inputs=None) -> torch.Tensor:
        """Cross-entropy of the student's attention weights against the teacher's, over real queries."""
        with torch.no_grad():
            teacher_window = Window("sliding", self.teacher_window or q.shape[2])
            teacher, _ = hybrid_attention_weights(q, k, None, None, window=teacher_window, scaling=self.scaling,
                                                  use_linear=False, start=start)
        softmax_part, linear_part = self._student_weights(q, k, start, log_decay, feature_inputs)
        per_query = -(teacher * torch.log((softmax_part + linear_part).clamp(min=1e-12))).sum(-1)  # (B, H, L)
        real = _real_queries(start, q.shape[2], per_query.dtype)
        return (per_query.mean(1) * real).sum() / real.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, mode={self.mode}, window={self.window}, linear={self.use_linear}, "
            f"teacher_window={self.teacher_window}"
        )


def _real_queries(start: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) weights: 1 for real positions, 0 for left padding."""
    return (torch.arange(length, device=start.device)[None, :] >= start[:, None]).to(dtype)


def _mean_over_real_queries(per_query: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(B, H, L) -> (H,): the mean over real (non-padding) queries."""
    real = _real_queries(start, per_query.shape[2], per_query.dtype)
    return (per_query * real[:, None]).sum((0, 2)) / real.sum().clamp(min=1)


def _masked_mse(predicted: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real tokens of (B, H, L, D) outputs (padding positions excluded)."""
    real = _real_queries(start, predicted.shape[2], predicted.dtype)
    squared = (predicted.float() - target.float()).pow(2).mean(dim=(1, 3))  # (B, L)
    return (squared * real).sum() / real.sum().clamp(min=1)
