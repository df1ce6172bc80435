"""RunConfig: everything `lolcats linearize` needs, loaded from YAML (packaged recipes in lolcats/configs) with
the command line's flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import LinearizeConfig
from ..models import DEFAULT_MODEL, resolve_dtype
from ..runtime.ops_common import Window
from . import distributed
from .loop import StageSettings


class RunConfig(BaseModel):
    """Everything `lolcats linearize` needs; YAML files use these keys, CLI flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _conversion_keys_belong_under_conversion(cls, data):
        if isinstance(data, dict):
            misplaced = sorted(set(data) & set(LinearizeConfig.model_fields))
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)}: conversion settings go under `conversion:` (e.g. "
                                 f"conversion: {{{misplaced[0]}: ...}}), not at the top level of a run config")
        return data

    model: str = DEFAULT_MODEL
    data: tuple[str, ...] = ()
    out: str
    # dtype of the frozen base weights: "auto" is bf16 where the device computes bf16 natively (GPUs, CPUs
    # with AVX-512 BF16/AMX), else fp32. φ, γ, LoRA factors, attention state and accumulation stay fp32.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # How each attention layer is converted: YAML `conversion: {window: 64, feature_map: hedgehog, ...}`; the
    # CLI's flat flags (--window, --feature-map, ...) land here too.
    conversion: LinearizeConfig = LinearizeConfig()
    # data
    seq_len: int = Field(512, ge=2)
    batch_tokens: int = Field(4096, ge=2)
    # A step's forward/backward runs in micro-batches of at most this many padded tokens (the same update:
    # gradients accumulate), which bounds the activations kept for backward (a 24-layer 0.5B model in fp32
    # peaked at 17.4 GB of process RSS with 2,048). None: the whole batch at once.
    micro_batch_tokens: int | None = Field(1024, ge=1)
    # Stage 2 recomputes each decoder layer in backward instead of keeping its activations (stages/lora.py):
    # about half the step's memory for about a fifth fewer tokens/s (benchmarks/results/stages-reference.md).
    # Stage 1 needs no such option: it keeps one layer's activations by construction (stages/transfer.py).
    activation_checkpointing: bool = False
    held_out: float = Field(0.05, gt=0)
    add_eos: bool = False
    # document: one document (or piece of one) per row, attention never crosses a boundary (default).
    # stream: BOS-separated documents concatenated into seq_len rows, attention crossing boundaries as
    # in pretraining on packed text; opt in when the teacher was trained and is evaluated that way.
    packing: Literal["document", "stream"] = "document"
    seed: int = 0
    # stage 1
    stage1_tokens: int = Field(300_000, ge=0)
    stage1_lr: float = Field(1e-2, gt=0)
    mse_scale: float = Field(1000.0, gt=0)
    attention_ce: float = Field(0.0, ge=0)
    # block-wise stage 1 (None: joint): blocks of block_size consecutive layers train apart from stored
    # teacher activations (see stages/blockwise.py)
    block_size: int | None = Field(None, ge=1)
    # A finished run whose stage-1 φ, γ and gate to reuse instead of training (`--stage1-from RUN`): stage 1 trains
    # each layer on teacher inputs, so its result for a layer does not depend on which others are linearized, and
    # one stage 1 serves every choice of softmax layers. Same base and conversion; softmax_layers may grow.
    stage1_from: str | None = None
    activations: str | None = None  # folder for the stored activations (default: <out>/blockwise/activations)
    activation_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Under a launcher: "ddp" replicates the model in every process; "fsdp" shards it for stage 2 (LoRA), each
    # process holding 1/N of the frozen base weights (stage 1 at scale is block-wise, see block_size).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # auto:K (`--softmax-layers auto:K`): after stage 1, keep as softmax the K converted layers whose
    # linearization alone costs most (training/ranking.py): K ≥ 1 layers, or a fraction below 1 of them.
    softmax_auto: float = Field(0, ge=0)
    rank_by: Literal["kl", "passkey"] = "kl"
    rank_tokens: int = Field(8192, ge=1)  # held-out tokens the ranking's KL is measured on
    probe_context: int = Field(1024, ge=16)  # passkey prompt length of the ranking's retrieval probe
    # stage 2
    stage2_tokens: int = Field(100_000, ge=0)
    stage2_lr: float = Field(1e-4, gt=0)
    stage2_loss: Literal["ce", "kl"] = "ce"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # loop
    warmup_steps: int = Field(10, ge=0)
    lr_decay: Literal["none", "cosine"] = "none"
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(25, ge=1)
    eval_tokens: int = Field(16384, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    # final report
    eval_text: tuple[str, ...] = ()
    eval_protocol: Literal["documents", "per-document", "bos-window"] = "documents"
    eval_max_tokens: int | None = None
    resume: bool = False

    @field_validator("softmax_auto")
    @classmethod
    def _auto_is_a_count_or_a_fraction(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"softmax_auto (auto:K) takes a whole number of layers or a fraction below 1, got {value}")
        return value

    @model_validator(mode="after")
    def _stage1_from_is_a_stage1(self):
        if self.stage1_from and self.block_size:
            raise ValueError("stage1_from reuses a finished stage 1; block-wise training (block_size) is a way to run "
                             "one: use one or the other")
        return self

    @model_validator(mode="after")
    def _rows_reach_the_linear_term(self):
        # A query's linear term holds keys older than its window: shorter rows would leave stage 1 nothing to train.
        conversion = self.conversion
        first = Window.of_attention(conversion.attention, conversion.window, conversion.sinks).first_linear_query
        if self.stage1_tokens and conversion.attention != "window" and self.seq_len <= first:
            raise ValueError(f"seq_len {self.seq_len} never reaches the linear term, which starts at position {first} with "
                             f"a {conversion.attention} window of {conversion.window}: stage 1 would have nothing to "
                             f"train. Raise seq_len above {first} or lower the window (--window)")
        return self

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, distributed.training_device())

    def activations_dir(self) -> Path:
        return Path(self.activations) if self.activations else Path(self.out) / "blockwise" / "activations"

    def _stage(self, name: str, tokens: int, lr: float) -> StageSettings:
        return StageSettings(name=name, tokens=tokens, lr=lr, batch_tokens=self.batch_tokens,
                             warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
                             eval_every=self.eval_every, eval_tokens=self.eval_tokens,
                             checkpoint_every=self.checkpoint_every, decay=self.lr_decay,
                             micro_batch_tokens=self.micro_batch_tokens)

    def stage1(self) -> StageSettings:
        return self._stage("stage1", self.stage1_tokens, self.stage1_lr)

    def stage2(self) -> StageSettings:
        return self._stage("stage2", self.stage2_tokens, self.stage2_lr)
