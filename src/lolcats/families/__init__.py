"""One small adapter per model family, chosen by ``config.model_type``."""

from .base import AttentionFamily
from .gemma3 import Gemma3Text
from .llama import Llama
from .mistral import Mistral
from .qwen2 import Qwen2
from .qwen3 import Qwen3

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


__all__ = ["AttentionFamily", "FAMILIES", "family_for"]
