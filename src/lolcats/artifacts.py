"""Artifacts on disk: the adapter (trained tensors only), the manifest, and trainer checkpoints.

Everything is safetensors or JSON (no pickle), and every file is written to a temporary name and moved
into place with os.replace, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LinearizeConfig
from .convert import add_lora, convert, merge_lora, set_attention_mode
from .models import load_base_model, load_tokenizer, resolve_dtype

MANIFEST = "lolcats.json"
ADAPTER = "adapter.safetensors"
FORMAT_VERSION = 1
_ADAPTER_MARKERS = ("feature_map_q", "feature_map_k", "decay_gate", "window_logit", "lora_A", "lora_B")
# Config keys that say how a file was saved, not what the model is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                         "_attn_implementation_autoset", "quantization_config", "_commit_hash"}


class ArtifactError(ValueError):
    """A saved artifact that cannot be used as asked (wrong base model, damaged or incomplete files)."""


def shareable(path: str | Path) -> None:
    """mkstemp/mkdtemp create files and folders for their owner only; artifacts get the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    shareable(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Mapping) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    shareable(tmp)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a damaged file gets an ArtifactError naming it."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is truncated or not a safetensors file ({err})") from None


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in _ADAPTER_MARKERS)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors lolcats trains: feature maps, γ logits and LoRA factors, under their model names."""
    return {name: p for name, p in model.named_parameters() if is_adapter_parameter(name)}


FINGERPRINT_SCHEME = "bf16-samples"
"""How weights_sha256 is computed; manifests without this marker (lolcats < 0.2) hashed fp32 samples."""


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of a base model's config and weights, to refuse an adapter on the wrong base.

    The same base loaded in fp32 or bf16 has the same fingerprint (see ``weights_hash``)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {"config_sha256": config_hash, "weights_sha256": weights_hash(model.state_dict().items()),
            "fingerprint": FINGERPRINT_SCHEME}


def weights_hash(named_tensors: Iterable[tuple[str, torch.Tensor]], canonical: torch.dtype = torch.bfloat16) -> str:
    """Hash of base tensors (adapter tensors skipped): each one's name, shape and a strided sample of up to
    4096 of its values, which separates different checkpoints of one architecture without hashing gigabytes.

    The sample is rounded to ``canonical`` (bf16) before hashing: a bf16 load of an fp32 checkpoint holds
    exactly those rounded values, so the hash does not depend on whether the base was loaded in fp32 or bf16.
    (An fp16 load rounds differently; ``load`` reads the base in fp32 to check it, then casts.)"""
    weights = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        if is_adapter_parameter(name):
            continue
        name = name.replace(".base_layer.", ".")  # peft-wrapped projections keep their base identity
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096]
        if sample.is_floating_point():
            sample = sample.to(canonical)
        weights.update(name.encode() + str(tuple(tensor.shape)).encode())
        weights.update(sample.float().cpu().numpy().tobytes())
    return weights.hexdigest()


def matches_fingerprint(model: nn.Module, recorded: Mapping[str, str]) -> str | None:
    """None if ``model`` is the base ``recorded`` describes; otherwise what differs ("config" or "weights")."""
    found = fingerprint(model)
    if found["config_sha256"] != recorded["config_sha256"]:
        return "config"
    if recorded.get("fingerprint") == FINGERPRINT_SCHEME:
        same = found["weights_sha256"] == recorded["weights_sha256"]
    else:  # an older manifest: fp32 samples, comparable only with a base loaded in fp32
        same = weights_hash(model.state_dict().items(), canonical=torch.float32) == recorded["weights_sha256"]
    return None if same else "weights"


# conversion options added after format_version 1, with the behaviour of the code that predates them
CONVERSION_BEFORE_OPTIONS = {"sinks": 0, "gate": "none", "linear_rope": True, "recall_cache": 0}


def save_adapter(directory: Path, model: nn.Module, manifest: Mapping) -> None:
    """Write adapter.safetensors (trained tensors only) and then lolcats.json, each atomically."""
    directory = Path(directory)
    atomic_save_tensors(adapter_state(model), directory / ADAPTER, {"format": "lolcats-adapter"})
    atomic_write_json(directory / MANIFEST, {"format_version": FORMAT_VERSION, **manifest})


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a lolcats output folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    if isinstance(manifest.get("conversion"), dict):
        # A manifest written before an option existed was trained without it, whatever today's default is.
        manifest["conversion"] = {**CONVERSION_BEFORE_OPTIONS, **manifest["conversion"]}
    return manifest


def load_adapter_into(model: nn.Module, path: Path) -> None:
    """Copy the saved tensors into ``model``; every expected tensor must be there with its shape."""
    saved, _ = read_tensors(path)
    copy_tensors_into(adapter_state(model), saved, str(path))


def copy_tensors_into(expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``saved`` into the ``expected`` tensors, which it must match name for name and shape for shape."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not match the converted model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, parameter in expected.items():
            if saved[name].shape != parameter.shape:
                raise ArtifactError(f"{source}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(parameter.shape)}")
            parameter.copy_(saved[name])


# ---- the trained model back from disk ------------------------------------------------------------------

def converted_with_lora(model: torch.nn.Module, conversion: LinearizeConfig, lora: dict | None) -> torch.nn.Module:
    """``model`` converted as recorded, with empty LoRA adapters of the recorded shape (to load tensors into)."""
    convert(model, conversion)
    if lora:
        add_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], dropout=lora.get("dropout", 0.0))
    return model


def load(directory: str | Path, *, base_model: str | None = None, merge: bool = True, dtype: torch.dtype | None = None):
    """The trained linearized model saved by ``linearize`` in ``directory``, in linear mode, eval().

    ``base_model`` overrides the base recorded in the manifest (e.g. the same weights in another folder);
    it must have the fingerprint the adapter was trained on. ``dtype`` is that of the frozen base weights
    (default: the dtype it was trained in); φ, γ and the attention state stay fp32 in any dtype.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = base_model or manifest["base_model"]["spec"]
    if dtype is None:
        dtype = resolve_dtype(manifest.get("dtype", "float32"), "cpu")
    # fp16 rounds the weights differently from the bf16 samples the fingerprint hashes: check an fp32 load.
    # (Loading again rather than model.to(fp16), which would also round RoPE's inv_freq buffer.)
    model = load_base_model(spec, dtype=torch.float32 if dtype == torch.float16 else dtype)
    which = matches_fingerprint(model, manifest["base_model"])
    if which:
        raise ArtifactError(
            f"{directory} was trained on base model {manifest['base_model']['spec']!r}, but {spec!r} has different "
            f"{which} (fingerprint mismatch): load it with the base model it was trained on"
        )
    if dtype == torch.float16:
        model = load_base_model(spec, dtype=dtype)
    lora = manifest.get("lora")
    converted_with_lora(model, LinearizeConfig.model_validate(manifest["conversion"]), lora)
    load_adapter_into(model, directory / ADAPTER)
    if lora and merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    set_attention_mode(model, "linear")
    model.lolcats_manifest = manifest
    return model.eval()


# ---- "a linearized folder or a base model": what eval, generate, export and bench accept ------------------

def is_linearized_folder(spec: str) -> bool:
    return (Path(spec).expanduser() / MANIFEST).is_file()


def base_model_spec(spec: str) -> str:
    """The base model of a linearized folder (from its manifest), or ``spec`` itself."""
    return read_manifest(Path(spec))["base_model"]["spec"] if is_linearized_folder(spec) else spec


def load_model(spec: str, dtype: torch.dtype | None = None):
    """A linearized folder through ``lolcats.load``, anything else as a base (teacher) model. ``dtype`` None:
    a linearized folder in the dtype it was trained in (what its numbers were measured in), a base in fp32."""
    if is_linearized_folder(spec):
        return load(spec, dtype=dtype)
    return load_base_model(spec, dtype=dtype or torch.float32)


def tokenizer_for(spec: str):
    return load_tokenizer(base_model_spec(spec))
