"""Pure tensor functions for linear and hybrid attention (no nn.Module, fp32 accumulation).

Each function has a quadratic reference beside its fast paths; the tests hold them together.
"""

from .ops_chunked import hybrid_attention_chunked, linear_attention_chunked
from .ops_common import Window, expand_heads
from .ops_recurrent import (
    RecurrentState,
    hybrid_attention_recurrent,
    hybrid_attention_step,
    linear_attention_recurrent,
    recurrent_state_from_prefix,
)
from .ops_reference import hybrid_attention_reference, hybrid_attention_weights, linear_attention_reference
from .ops_softmax import softmax_attention

__all__ = [
    "RecurrentState",
    "Window",
    "expand_heads",
    "hybrid_attention_chunked",
    "hybrid_attention_recurrent",
    "hybrid_attention_reference",
    "hybrid_attention_weights",
    "hybrid_attention_step",
    "linear_attention_chunked",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "recurrent_state_from_prefix",
    "softmax_attention",
]
