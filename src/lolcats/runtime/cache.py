"""The generation cache of a linearized model, in transformers' Cache API.

Per linearized layer it holds a ``RecurrentState``: the fp32 linear state (Σ φ(k)vᵀ, Σ φ(k); a terrace
window keeps a second pair for the keys of the block about to leave it) and a ring of the window's recent
keys/values in the model's dtype, so its size does not depend on the context length. Decode steps update
it in place with static shapes and no host synchronisation; only the column count that
``get_seq_length`` reports is a host integer. Layers
kept as softmax (``softmax_layers``, a family's local sliding-window layers) keep transformers' own
cache layers (full, or sliding for sliding-window layers).

Users never build it by hand: a converted model swaps the empty cache that ``generate()`` (or a
forward with ``use_cache=True``) creates for this one, so ``model.generate(...)`` just works.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from .ops import RecurrentState


class RecurrentLayer(CacheLayerMixin):
    """One linearized layer's cache; the attention module fills ``state`` itself (no ``update``)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.state: RecurrentState | None = None

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a linearized layer's cache is filled by its attention module, not by update()")

    def get_seq_length(self, *args) -> int:
        return 0 if self.state is None else self.state.columns

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # Masks built for this layer are never read (it uses the 2D padding mask); size them like a full layer.
        if isinstance(query_length, torch.Tensor):  # transformers < 5 passes cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back (crop): assisted decoding is not supported")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.lengths.shape[0], device=self.state.lengths.device)
            self.state.select_rows(rows.repeat_interleave(repeats))

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()


class LinearizedCache(DynamicCache):
    """transformers' dynamic cache with a ``RecurrentLayer`` at every linearized layer."""

    def __init__(self, config, linearized_layers: list[int]) -> None:
        super().__init__(config=config)
        num_layers = config.num_hidden_layers
        if len(self.layers) != num_layers:
            raise RuntimeError(f"expected {num_layers} cache layers from transformers, got {len(self.layers)}")
        for layer_idx in linearized_layers:
            self.layers[layer_idx] = RecurrentLayer()

    def nbytes(self) -> int:
        """Bytes held by the cache: the recurrent states plus any softmax layers' keys and values."""
        return cache_nbytes(self)


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache (keys and values of every layer), recurrent states included."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RecurrentLayer):
            total += layer.nbytes()
            continue
        tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total
