"""`lolcats linearize`: base model + data -> converted model, attention transfer, LoRA, artifact.

The flow, top to bottom: load the teacher and its fingerprint -> read and split the data -> convert ->
stage 1 (attention transfer) -> stage 2 (LoRA) -> save adapter + manifest -> teacher vs linearized
perplexity. ``load(DIR)`` rebuilds the trained model from what ``linearize`` saved.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .checkpoint import (
    ADAPTER,
    ArtifactError,
    atomic_write_json,
    fingerprint,
    load_adapter_into,
    read_manifest,
    save_adapter,
)
from .config import AttentionKind, FeatureMapName, LinearizeConfig
from .convert import convert, linearized_layers, set_attention_mode
from .data import count_tokens, pack_stream, pad_id_for, read_documents, split_held_out, tokenize_documents
from .evaluate.perplexity import perplexity
from .models import DEFAULT_MODEL, load_base_model, load_tokenizer
from .stages.loop import StageSettings, train_stage
from .stages.lora import add_lora, lm_loss_fn, lora_parameters, merge_lora, teacher_kl_loss_fn
from .stages.transfer import transfer_loss_fn, transfer_parameters


class RunConfig(BaseModel):
    """Everything `lolcats linearize` needs; YAML files use these keys, CLI flags override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL
    data: tuple[str, ...] = ()
    out: str
    # conversion (LinearizeConfig)
    attention: AttentionKind = "lolcats"
    feature_map: FeatureMapName = "hedgehog"
    window: int = Field(64, ge=1)
    feature_dim: int = Field(64, ge=1)
    softmax_layers: tuple[int, ...] = ()
    local_layers: Literal["keep", "linearize"] = "keep"
    # data
    seq_len: int = Field(512, ge=2)
    batch_tokens: int = Field(4096, ge=2)
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

    def conversion(self) -> LinearizeConfig:
        return LinearizeConfig(attention=self.attention, feature_map=self.feature_map, window=self.window,
                               feature_dim=self.feature_dim, softmax_layers=self.softmax_layers,
                               local_layers=self.local_layers)

    def stage(self, name: str, tokens: int, lr: float) -> StageSettings:
        return StageSettings(name=name, tokens=tokens, lr=lr, batch_tokens=self.batch_tokens,
                             warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
                             eval_every=self.eval_every, eval_tokens=self.eval_tokens,
                             checkpoint_every=self.checkpoint_every, decay=self.lr_decay)


def _versions() -> dict:
    import peft
    import transformers

    return {"lolcats": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def linearize(run: RunConfig, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest written to run.out/lolcats.json."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    echo(f"loading {run.model}")
    tokenizer = load_tokenizer(run.model)
    model = load_base_model(run.model)
    base_fingerprint = fingerprint(model)

    data_files, eval_files = list(run.data), list(run.eval_text)
    if not data_files:
        if run.model != DEFAULT_MODEL:
            raise ValueError("--data is required unless the model is the embedded default")
        from .demo_data import default_data

        train_file, held_file = default_data(model, tokenizer, base_fingerprint["weights_sha256"], echo=echo)
        data_files, eval_files = [str(train_file)], eval_files or [str(held_file)]

    documents = [doc for path in data_files for doc in read_documents(path)]
    examples = tokenize_documents(documents, tokenizer, run.seq_len, add_eos=run.add_eos)
    held_out = int(run.held_out) if run.held_out >= 1 else run.held_out
    train, held = split_held_out(examples, held_out, run.seed)
    if run.packing == "stream":
        train, held = pack_stream(train, run.seq_len, run.seed), pack_stream(held, run.seq_len, run.seed)
    pad_id = pad_id_for(tokenizer)
    echo(f"data: {len(documents)} documents, {count_tokens(train):,} training tokens, {count_tokens(held):,} held out")

    forward_speed: dict[str, float] = {}

    def measure(who: str) -> dict[str, float]:
        """Perplexity on each --eval-text file, and on the held-out split; times the plain forward."""
        started, tokens, scores = time.perf_counter(), 0, {}
        for path in eval_files:
            result = perplexity(model, tokenizer, path, seq_len=run.seq_len, protocol=run.eval_protocol,
                                max_tokens=run.eval_max_tokens)
            scores[path], tokens = result.ppl, tokens + result.tokens
        if tokens:
            forward_speed[who] = tokens / (time.perf_counter() - started)
        scores["held-out split"] = held_out_perplexity(model, held, pad_id, run.batch_tokens, run.eval_tokens)
        return scores

    teacher_ppl = measure("teacher")

    conversion = run.conversion()
    convert(model, conversion)
    layers = list(linearized_layers(model))
    echo(f"converted layers {[layer.layer_idx for layer in layers]}")
    stages: dict[str, dict] = {}

    if run.stage1_tokens > 0 and any(layer.use_linear for layer in layers):
        result = train_stage(
            transfer_parameters(model), transfer_loss_fn(model, mse_scale=run.mse_scale, attention_ce=run.attention_ce),
            train, held, run.stage("stage1", run.stage1_tokens, run.stage1_lr),
            seed=run.seed, pad_id=pad_id, run_dir=out, resume=run.resume, progress=progress,
        )
        stages["stage1"] = result.summary()
        echo(f"stage 1: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
             f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    set_attention_mode(model, "linear")
    for p in model.parameters():
        p.requires_grad_(False)

    lora = None
    if run.stage2_tokens > 0:
        lora = add_lora(model, rank=run.lora_rank, alpha=run.lora_alpha, targets=run.lora_targets)
        result = train_stage(
            lora_parameters(model), lm_loss_fn(model) if run.stage2_loss == "ce" else teacher_kl_loss_fn(model), train, held, run.stage("stage2", run.stage2_tokens, run.stage2_lr),
            seed=run.seed + 1, pad_id=pad_id, run_dir=out, resume=run.resume, progress=progress,
        )
        stages["stage2"] = result.summary()
        echo(f"stage 2: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
             f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    model.eval()

    diagnostics = attention_diagnostics(model, train[: max(1, min(8, len(train)))], pad_id)
    manifest = {
        "base_model": {"spec": run.model, **base_fingerprint},
        "conversion": conversion.model_dump(mode="json"),
        "lora": lora,
        "run": run.model_dump(mode="json"),
        "data": {"files": data_files, "documents": len(documents), "train_tokens": count_tokens(train),
                 "held_out_tokens": count_tokens(held)},
        "stages": stages,
        "versions": _versions(),
        "metrics": {"layers": diagnostics},
    }
    save_adapter(out, model, manifest)

    if lora is not None:
        merge_lora(model)
    linear_ppl = measure("linearized")
    manifest["metrics"]["perplexity"] = {
        path: {"teacher": teacher_ppl[path], "linearized": linear_ppl[path],
               "ratio": linear_ppl[path] / teacher_ppl[path],
               "protocol": run.eval_protocol if path in eval_files else f"held-out split, {run.packing} packing",
               "seq_len": run.seq_len} for path in teacher_ppl
    }
    manifest["metrics"]["forward_tokens_per_s"] = forward_speed
    atomic_write_json(out / "lolcats.json", {"format_version": 1, **manifest})
    for path in teacher_ppl:
        row = manifest["metrics"]["perplexity"][path]
        echo(f"perplexity on {Path(path).name}: teacher {row['teacher']:.3f}, linearized {row['linearized']:.3f} "
             f"(x{row['ratio']:.4f})")
    echo(f"saved {out / ADAPTER} and {out / 'lolcats.json'}")
    return manifest


@torch.no_grad()
def held_out_perplexity(model, held, pad_id: int, batch_tokens: int, max_tokens: int) -> float:
    """exp(mean NLL) over the label tokens of (up to ``max_tokens`` of) the held-out examples."""
    from .data import IGNORE_INDEX, make_batches

    device = next(model.parameters()).device
    total = count = 0.0
    for batch in make_batches(held, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
        if count >= max_tokens:
            break
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False).logits.float()
        labels = batch.labels[:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def attention_diagnostics(model, examples, pad_id: int) -> list[dict]:
    """Per converted layer: γ per head and the share of attention mass the linear term carries."""
    from .data import make_batches

    layers = list(linearized_layers(model))
    if not layers:
        return []
    batch = make_batches(examples, batch_tokens=10**9, seed=0, epoch=0, pad_id=pad_id)[0]
    set_attention_mode(model, "linear")
    for layer in layers:
        layer.record_linear_share = layer.use_linear
    device = next(model.parameters()).device
    model.get_decoder()(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    rows = []
    for layer in layers:
        layer.record_linear_share = False
        share = layer.linear_share.tolist() if layer.linear_share is not None else None
        rows.append({"layer": layer.layer_idx, "gamma": [round(g, 4) for g in layer.gamma.tolist()],
                     "linear_share": [round(s, 4) for s in share] if share else None})
        layer.linear_share = None
    return rows


def load(directory: str | Path, *, base_model: str | None = None, merge: bool = True, dtype: torch.dtype = torch.float32):
    """The trained linearized model saved by ``linearize`` in ``directory``, in linear mode, eval().

    ``base_model`` overrides the base recorded in the manifest (e.g. the same weights in another folder);
    it must have the fingerprint the adapter was trained on.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    spec = base_model or manifest["base_model"]["spec"]
    model = load_base_model(spec, dtype=dtype)
    found = fingerprint(model)
    expected = {key: manifest["base_model"][key] for key in ("config_sha256", "weights_sha256")}
    if found != expected:
        which = "config" if found["config_sha256"] != expected["config_sha256"] else "weights"
        raise ArtifactError(
            f"{directory} was trained on base model {manifest['base_model']['spec']!r}, but {spec!r} has different "
            f"{which} (fingerprint mismatch): load it with the base model it was trained on"
        )
    convert(model, LinearizeConfig.model_validate(manifest["conversion"]))
    lora = manifest.get("lora")
    if lora:
        add_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], dropout=lora.get("dropout", 0.0))
    load_adapter_into(model, directory / ADAPTER)
    if lora and merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    set_attention_mode(model, "linear")
    model.lolcats_manifest = manifest
    return model.eval()
