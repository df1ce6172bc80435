"""Typed configuration. YAML files and CLI flags both land here; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AttentionKind = Literal["lolcats", "sliding", "linear", "window"]
GateKind = Literal["none", "scalar"]
FeatureMapName = Literal["hedgehog", "t2r", "elu", "relu", "taylor"]


class LinearizeConfig(BaseModel):
    """How each attention layer is converted.

    attention:
      lolcats  terrace softmax window (blocks of `window` tokens, default 128) + linear attention over older keys
               (default)
      sliding  true sliding softmax window of the last `window` tokens + linear attention over older keys
      linear   linear attention only, no softmax window
      window   the terrace softmax window alone, no linear term (an ablation: nothing to train)
    sinks: the first N real tokens of each row stay exact softmax terms for every query (attention sinks,
      as in StreamingLLM and Lizard), on top of the window; they never enter the linear term (default 4; 0: none,
      as LoLCATs)
    gate:
      none     the linear state never forgets (LoLCATs)
      scalar   a data-dependent decay per head on the linear state, trained in stage 1 with φ and γ; it starts
               forgetting nothing, so a new gate leaves the converted model exactly as without it (runtime/gate.py);
               the default wherever there is a linear term
    linear_rope: φ reads q and k after RoPE (true, LoLCATs) or before it (false, as Lizard, the default: the linear
      term then carries no position, the softmax window keeps RoPE)
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
    window: int = Field(128, ge=1)
    sinks: int = Field(4, ge=0)  # default: 4, or 0 for attention="linear" (no softmax part to hold them)
    gate: GateKind = "scalar"  # default: scalar, or none for attention="window" (no linear state to decay)
    linear_rope: bool = False
    recall_cache: int = Field(0, ge=0)
    feature_dim: int = Field(64, ge=1)
    softmax_layers: tuple[int, ...] = ()
    local_layers: Literal["keep", "linearize"] = "keep"
    gamma_init: float = Field(0.1, gt=0.0, lt=1.0)
    chunk_size: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _defaults_that_fit_the_attention(cls, data):
        # The student defaults (sinks, gate) apply where the attention has the part they act on, so that
        # attention="linear" or "window" alone is still a valid config.
        if isinstance(data, dict):
            attention = data.get("attention", "lolcats")
            if data.get("sinks") is None:
                data = {**data, "sinks": 0 if attention == "linear" else cls.model_fields["sinks"].default}
            if data.get("gate") is None:
                data = {**data, "gate": "none" if attention == "window" else cls.model_fields["gate"].default}
        return data

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
