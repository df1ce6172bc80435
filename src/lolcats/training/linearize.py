"""`lolcats linearize`: base model + data -> converted model, attention transfer, LoRA, artifact.

The flow, top to bottom: load the teacher and its fingerprint (prepare.py) -> read and split the data ->
convert -> stage 1 (attention transfer, transfer.py; block-wise: blockwise.py) -> stage 2 (LoRA, lora.py) ->
save adapter + manifest (artifacts.py) -> teacher vs linearized perplexity. ``lolcats.load(DIR)`` rebuilds
the trained model from what ``linearize`` saved.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers

from ..artifacts import ADAPTER, adapter_state, atomic_write_json, converted_with_lora, copy_tensors_into, save_adapter
from ..convert import add_lora, convert, linearized_layers, lora_parameters, merge_lora, set_attention_mode
from ..data import IGNORE_INDEX, count_tokens, make_batches
from ..evaluate.perplexity import next_token_nll, perplexity
from ..models import dtype_name, load_base_model
from ..runtime import family_for
from ..version import __version__
from . import distributed
from .blockwise import blockwise_stage1
from .config import RunConfig
from .loop import example_data, train_stage
from .lora import lm_loss_fn, recompute_layers_in_backward, teacher_kl_loss_fn
from .prepare import prepare
from .transfer import transfer_loss_fn, transfer_parameters


def linearize(run: RunConfig, echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest written to run.out/lolcats.json.

    Under a launcher (torchrun) every process runs this; training is data parallel,
    and only rank 0 measures perplexity and writes the artifact.
    """
    distributed.init_from_environment()
    main = distributed.is_main()
    if not main:
        echo = _silent
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(run, echo)
    model, tokenizer, train, held, pad_id = prepared.model, prepared.tokenizer, prepared.train, prepared.held, prepared.pad_id
    eval_files = prepared.eval_files

    forward_speed: dict[str, float] = {}

    def measure(who: str) -> dict[str, float]:
        """Perplexity on each --eval-text file, and on the held-out split; times the plain forward."""
        if not main:
            return {}
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

    conversion = run.conversion
    convert(model, conversion)
    layers = list(linearized_layers(model))
    echo(f"converted layers {[layer.layer_idx for layer in layers]}")
    stages: dict[str, dict] = {}

    stage1 = run.stage1()
    if run.stage1_tokens > 0 and any(layer.use_linear for layer in layers):
        if run.block_size:
            stages["stage1"] = blockwise_stage1(run, prepared, echo=echo, progress=progress)
            echo(f"stage 1 (block-wise, {run.block_size} layer(s) a block): "
                 + ", ".join(f"block {b} eval loss {r['first_eval_loss']:.4g} -> {r['best_eval_loss']:.4g}"
                             for b, r in stages["stage1"]["blocks"].items()))
        else:
            result = train_stage(
                transfer_parameters(model), transfer_loss_fn(model, mse_scale=run.mse_scale, attention_ce=run.attention_ce),
                example_data(train, held, stage1, seed=run.seed, pad_id=pad_id), stage1,
                run_dir=out, resume=run.resume, progress=progress,
            )
            stages["stage1"] = result.summary()
            echo(f"stage 1: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
                 f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    set_attention_mode(model, "linear")
    for p in model.parameters():
        p.requires_grad_(False)

    lora = None
    sharded = run.parallel == "fsdp" and distributed.world_size() > 1
    if run.stage2_tokens > 0:
        lora = add_lora(model, rank=run.lora_rank, alpha=run.lora_alpha, targets=run.lora_targets)
        if sharded:
            distributed.shard_model(model, family_for(model.config).decoder_layers(model))
        stage2 = run.stage2()
        recompute_layers_in_backward(model, run.activation_checkpointing)
        try:
            result = train_stage(
                lora_parameters(model), lm_loss_fn(model) if run.stage2_loss == "ce" else teacher_kl_loss_fn(model),
                example_data(train, held, stage2, seed=run.seed + 1, pad_id=pad_id), stage2,
                run_dir=out, resume=run.resume, progress=progress,
            )
        finally:
            recompute_layers_in_backward(model, False)
        stages["stage2"] = result.summary()
        echo(f"stage 2: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
             f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    model.eval()
    whole = {name: distributed.full_tensor(t.detach()) for name, t in adapter_state(model).items()} if sharded else None
    if not main:
        distributed.barrier()  # wait for rank 0's artifact
        return {}
    if whole is not None:
        model = _unsharded(run, lora, whole)

    diagnostics = attention_diagnostics(model, train[: max(1, min(8, len(train)))], pad_id)
    manifest = {
        "base_model": {"spec": run.model, **prepared.base_fingerprint},
        "dtype": dtype_name(run.torch_dtype()),
        "conversion": conversion.model_dump(mode="json"),
        "lora": lora,
        "run": run.model_dump(mode="json"),
        "data": {"files": prepared.data_files, "documents": prepared.documents, "train_tokens": count_tokens(train),
                 "held_out_tokens": count_tokens(held)},
        "stages": stages,
        "versions": _versions(),
        "metrics": {"layers": diagnostics},
        "processes": distributed.world_size(),
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
    distributed.barrier()
    return manifest


def _silent(message: str) -> None:
    pass


def _unsharded(run: RunConfig, lora: dict | None, adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A whole copy of the trained model in this process, from the base and the gathered adapter tensors."""
    model = converted_with_lora(load_base_model(run.model, dtype=run.torch_dtype()), run.conversion, lora)
    copy_tensors_into(adapter_state(model), adapter, "the gathered FSDP adapter")
    set_attention_mode(model, "linear")
    return model.eval()


def _versions() -> dict:
    return {"lolcats": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def held_out_perplexity(model, held, pad_id: int, batch_tokens: int, max_tokens: int) -> float:
    """exp(mean NLL) over the label tokens of (up to ``max_tokens`` of) the held-out examples."""

    def batches():
        scored = 0
        for batch in make_batches(held, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
            if scored >= max_tokens:
                return
            yield batch.input_ids, batch.attention_mask, batch.labels
            scored += int((batch.labels[:, 1:] != IGNORE_INDEX).sum())

    total, count = next_token_nll(model, batches())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def attention_diagnostics(model, examples, pad_id: int) -> list[dict]:
    """Per converted layer: γ per head and the share of attention mass the linear term carries."""
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
