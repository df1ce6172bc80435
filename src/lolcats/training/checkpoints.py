"""Trainer checkpoints: what an exact resume needs (trained tensors, AdamW's moments, the learning-rate
schedule's state_dict, the RNG, the loop's counters), one safetensors file per stage, written atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..artifacts import ArtifactError, atomic_save_tensors, read_tensors
from .schedule import legacy_schedule_state


def save_trainer_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainer: Mapping,
    extra: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One file holds the trained tensors, AdamW's moments, the RNG, ``extra`` tensors (e.g. the best
    state so far), the loop's counters and the LR ``schedule``'s state_dict (both as JSON metadata).
    ``optimizer_state`` replaces the optimizer's own per-parameter state (whole tensors gathered from shards)."""
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
    if schedule is not None:
        metadata["schedule"] = json.dumps(schedule.state_dict())
    atomic_save_tensors(tensors, path, metadata)


def load_trainer_checkpoint(
    path: Path,
    parameters: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    extra: Mapping[str, torch.Tensor] | None = None,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict:
    """Restore what save_trainer_checkpoint wrote, in place; returns the loop's counters. Build ``schedule``
    on ``optimizer`` before calling this (its state is loaded after the optimizer's, and sets the LR)."""
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
    trainer = json.loads(metadata["trainer"])
    if schedule is not None:
        if "schedule" in metadata:
            schedule.load_state_dict(json.loads(metadata["schedule"]))
        elif {"step", "tokens", "plateau_scale", "bad_evals"} <= trainer.keys():
            # Written before the schedule had a state_dict: its counters were the loop's.
            schedule.load_state_dict(legacy_schedule_state(trainer))
        else:
            raise ArtifactError(f"{path} holds no learning-rate schedule state; run the stage again without --resume")
    for key in ("plateau_scale", "bad_evals"):  # the schedule's now (older checkpoints kept them here)
        trainer.pop(key, None)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return trainer
