from .base import AttentionFamily


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
