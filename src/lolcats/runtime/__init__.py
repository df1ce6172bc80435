"""What a linearized model needs at inference, and exactly what `lolcats export` ships: the tensor ops
(ops_reference.py, the quadratic ground truth, beside ops_chunked.py and ops_recurrent.py), the feature maps,
the per-family adapters, the attention module, the generation cache and the swap that installs them.

These files import torch, transformers and each other only, with single-dot relative imports of sibling
modules: that is the one form transformers' remote-code loader follows, so export copies them verbatim
beside the exported model's modeling file. Keep it flat and free of other dependencies (a test checks).
"""

from .attention import LinearizedAttention
from .families import FAMILIES, AttentionFamily, family_for
from .swap import linearized_layers, set_attention_mode, swap_attention

__all__ = ["FAMILIES", "AttentionFamily", "LinearizedAttention", "family_for", "linearized_layers",
           "set_attention_mode", "swap_attention"]
