"""Typed configuration. YAML files and CLI flags both land here; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

AttentionKind = Literal["lolcats", "sliding", "linear", "window"]
GateKind = Literal["none", "scalar"]
FeatureMapName = Literal["hedgehog", "t2r", "elu", "relu", "taylor"]


class LinearizeConfig(BaseModel):
    """How each attention layer is converted.

    attention:
      lolcats  terrace softmax window (64-token blocks) + linear attention over older keys (default)
      sliding  true sliding softmax window of the last `window` tokens + linear attention over older keys
      linear   linear attention only, no softmax window
      window   the terrace softmax window alone, no linear term (an ablation: nothing to train)
    sinks: the first N real tokens of each row stay exact softmax terms for every query (attention sinks,
      as in StreamingLLM and Lizard), on top of the window; they never enter the linear term (0: none)
    gate:
      none     the linear state never forgets (LoLCATs)
      scalar   a data-dependent decay per head on the linear state, trained in stage 1 with φ and γ; it starts
               forgetting nothing, so a new gate leaves the converted model exactly as without it (runtime/gate.py)
    linear_rope: φ reads q and k after RoPE (true, LoLCATs) or before it (false, as Lizard: the linear term then
      carries no position, the softmax window keeps RoPE)
    recall_cache: K > 0 keeps, per layer and query head, the K past keys the linear state recalls worst as exact
      softmax terms (LoLA; runtime/ops_recall.py): an inference-time option (training runs without it), terrace
      window only, constant memory
    local_layers (models with local sliding-window layers, e.g. Gemma 3):
      keep       leave them as the teacher's exact sliding-window softmax; they already run in
                 constant memory, so only the global layers are linearized (default)
      linearize  convert them too (their linear term then reaches past the teacher's window)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attention: AttentionKind = "lolcats"
    feature_map: FeatureMapName = "hedgehog"
    window: int = Field(64, ge=1)
    sinks: int = Field(0, ge=0)
    gate: GateKind = "none"
    linear_rope: bool = True
    recall_cache: int = Field(0, ge=0)
    feature_dim: int = Field(64, ge=1)
    softmax_layers: tuple[int, ...] = ()
    local_layers: Literal["keep", "linearize"] = "keep"
    gamma_init: float = Field(0.1, gt=0.0, lt=1.0)
    chunk_size: int = Field(64, ge=1)

    @field_validator("softmax_layers")
    @classmethod
    def _distinct_layers(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if any(i < 0 for i in layers):
            raise ValueError(f"softmax_layers must be non-negative layer indices, got {layers}")
        return tuple(sorted(set(layers)))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data
