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

MANIFEST = "lolcats.json"
ADAPTER = "adapter.safetensors"
FORMAT_VERSION = 1
_ADAPTER_MARKERS = ("feature_map_q", "feature_map_k", "window_logit", "lora_A", "lora_B")
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


# ---- trainer checkpoints -------------------------------------------------------------------------

def save_trainer_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainer: Mapping,
    extra: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """One file holds the trained tensors, AdamW's moments, the RNG, ``extra`` tensors (e.g. the best
    state so far) and the loop's counters (as metadata). ``optimizer_state`` replaces the optimizer's own
    per-parameter state (whole tensors gathered from shards)."""
    tensors = {f"param.{name}": p for name, p in parameters.items()}
    tensors.update({f"extra.{name}": t for name, t in (extra or {}).items()})
    state = optimizer.state_dict()
    for index, per_param in (optimizer_state if optimizer_state is not None else state["state"]).items():
        for key, value in per_param.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # this process's device
    metadata = {"trainer": json.dumps(dict(trainer)), "param_groups": json.dumps(state["param_groups"])}
    atomic_save_tensors(tensors, path, metadata)


def load_trainer_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Restore what save_trainer_checkpoint wrote, in place; returns the loop's counters."""
    tensors, metadata = read_tensors(path)
    targets = {f"param.{name}": p for name, p in parameters.items()}
    targets.update({f"extra.{name}": t for name, t in (extra or {}).items()})
    with torch.no_grad():
        for key, target in targets.items():
            if key not in tensors or tensors[key].shape != target.shape:
                raise ArtifactError(f"{path} has no matching tensor {key}: it belongs to a different run")
            target.copy_(tensors[key])
    optim_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return json.loads(metadata["trainer"])
