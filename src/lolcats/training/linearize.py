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

from ..artifacts import (ADAPTER, ArtifactError, adapter_state, atomic_write_json, converted_with_lora, copy_tensors_into,
                         load_adapter_into, matches_fingerprint, read_manifest, read_tensors, save_adapter)
from ..config import LinearizeConfig
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
from .ranking import format_ranking, held_out_batches, layer_costs, passkey_probes, rank, softmax_count
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

    if run.stage1_from:
        stages["stage1"] = reuse_stage1(Path(run.stage1_from), model, conversion, echo=echo)
    elif run.stage1_tokens > 0 and any(layer.use_linear for layer in layers):
        stages["stage1"] = attention_transfer(run, prepared, model, echo=echo, progress=progress)
    set_attention_mode(model, "linear")
    ranking = None
    if run.softmax_auto:
        model, conversion, ranking = keep_costliest_layers(run, prepared, model, conversion, echo=echo)
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
        **({"layer_ranking": ranking} if ranking else {}),
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


def rank_layers(run: RunConfig, *, probe: bool = False, echo: Callable[[str], None] = print,
                progress: bool = True) -> dict:
    """`lolcats rank-layers`: convert, stage 1 on every converted layer, then what linearizing each layer alone
    costs; writes run.out/ranking.json (read by `lolcats report`) and returns it."""
    started = time.perf_counter()
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(run, echo)
    model = convert(prepared.model, run.conversion)
    if not any(layer.use_linear for layer in linearized_layers(model)):
        raise ValueError("no converted layer has a linear term: there is nothing to rank")
    stage1 = attention_transfer(run, prepared, model, echo=echo, progress=progress) if run.stage1_tokens else None
    ranking = rank_converted_layers(run, prepared, model, probe=probe, echo=echo)
    result = {"base_model": {"spec": run.model, **prepared.base_fingerprint}, "conversion": run.conversion.model_dump(mode="json"),
              "seed": run.seed, "stage1": stage1, **ranking, "seconds": time.perf_counter() - started}
    return _save_ranking(out, result, echo)


def _save_ranking(out: Path, result: dict, echo, how: str = "") -> dict:
    """Write OUT/ranking.json (read by `lolcats report`) and print its table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ranking.json", result)
    echo(format_ranking(result, result["order"]))
    echo(f"saved {out / 'ranking.json'} ({result['seconds']:.0f} s{how})")
    return result


def rank_layers_from_run(run_dir: str | Path, overrides: dict, *, probe: bool = False,
                         echo: Callable[[str], None] = print) -> dict:
    """`lolcats rank-layers --from RUN`: rank with a finished run's stage-1 φ, γ and gate, its LoRA dropped, on its
    own held-out split (the recorded data, seq_len and seed), with no training: a stage 1 of every layer is a stage 1
    of each layer alone (ranking.py). ``overrides``: out (default RUN: ranking.json beside its manifest), data,
    rank_tokens, probe_context, rank_by. Writes OUT/ranking.json and returns it."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if "stage1" not in manifest.get("stages", {}):
        raise ValueError(f"{run_dir} had no stage 1 (its φ and γ are untrained): rank with a stage 1 instead of --from")
    recorded = {key: value for key, value in manifest["run"].items() if key in RunConfig.model_fields}
    run = RunConfig(**{**recorded, "out": str(run_dir), "resume": False, **overrides})
    prepared = prepare(run, echo)
    which = matches_fingerprint(prepared.model, manifest["base_model"])
    if which:
        raise ArtifactError(f"{run_dir} was trained on another base model than {run.model!r} ({which} differ)")
    lora = manifest.get("lora")
    model = converted_with_lora(prepared.model, LinearizeConfig.model_validate(manifest["conversion"]), lora)
    load_adapter_into(model, run_dir / ADAPTER)
    if lora:
        merge_lora(model, merge=False)  # stage 2 adapted the projections to every layer's student at once
    model.eval()
    ranking = rank_converted_layers(run, prepared, model, probe=probe, echo=echo)
    result = {"base_model": manifest["base_model"], "conversion": manifest["conversion"], "seed": run.seed,
              "from_run": str(run_dir), "stage1": manifest["stages"]["stage1"], **ranking,
              "seconds": time.perf_counter() - started}
    return _save_ranking(Path(run.out), result, echo, f", no training: the stage 1 of {run_dir}")


def attention_transfer(run: RunConfig, prepared, model, *, echo=print, progress: bool = True) -> dict:
    """Stage 1 on every converted layer (jointly, or block-wise from stored activations); its summary."""
    if run.block_size:
        summary = blockwise_stage1(run, prepared, echo=echo, progress=progress)
        echo(f"stage 1 (block-wise, {run.block_size} layer(s) a block): "
             + ", ".join(f"block {b} eval loss {r['first_eval_loss']:.4g} -> {r['best_eval_loss']:.4g}"
                         for b, r in summary["blocks"].items()))
        return summary
    stage1 = run.stage1()
    result = train_stage(
        transfer_parameters(model), transfer_loss_fn(model, mse_scale=run.mse_scale, attention_ce=run.attention_ce),
        example_data(prepared.train, prepared.held, stage1, seed=run.seed, pad_id=prepared.pad_id), stage1,
        run_dir=Path(run.out), resume=run.resume, progress=progress,
    )
    echo(f"stage 1: {result.tokens:,} tokens, {result.tokens_per_s:.0f} tok/s, eval loss "
         f"{result.first_eval_loss:.4g} -> {result.best_eval_loss:.4g} (best at step {result.best_step})")
    return result.summary()


def reuse_stage1(source: Path, model, conversion: LinearizeConfig, *, echo=print) -> dict:
    """Copy a finished run's stage-1 φ, γ and gate into ``model`` (converted with ``conversion``): the same base and
    conversion, with the same or more softmax layers. Returns the source's stage-1 summary, marked with its folder."""
    manifest = read_manifest(source)
    if "stage1" not in manifest.get("stages", {}):
        raise ValueError(f"--stage1-from {source}: that run had no stage 1 to reuse")
    which = matches_fingerprint(model, manifest["base_model"])  # (the converted layers' own tensors are skipped)
    if which:
        raise ArtifactError(f"--stage1-from {source} was trained on another base model ({which} differ)")
    theirs = LinearizeConfig.model_validate(manifest["conversion"])
    mismatched = [key for key in LinearizeConfig.model_fields if key not in ("softmax_layers", "recall_cache")
                  and getattr(theirs, key) != getattr(conversion, key)]
    if mismatched:
        raise ValueError(f"--stage1-from {source} was converted differently: "
                         + ", ".join(f"{key} {getattr(theirs, key)!r} there, {getattr(conversion, key)!r} here"
                                     for key in mismatched))
    untrained = sorted(set(theirs.softmax_layers) - set(conversion.softmax_layers))
    if untrained:
        raise ValueError(f"--stage1-from {source} kept layers {untrained} as softmax: it has no stage 1 for them; keep "
                         "them as softmax here too (--softmax-layers)")
    saved, _ = read_tensors(source / ADAPTER)
    wanted = transfer_parameters(model)
    copy_tensors_into(wanted, {name: saved[name] for name in wanted if name in saved}, str(source / ADAPTER))
    echo(f"stage 1: reused from {source} ({len(wanted)} tensors; {manifest['stages']['stage1'].get('tokens', 0):,} "
         "tokens there)")
    return {**manifest["stages"]["stage1"], "from_run": str(source)}


def rank_converted_layers(run: RunConfig, prepared, model, *, probe: bool = False, echo=print) -> dict:
    """What linearizing each converted layer alone costs (training/ranking.py), after stage 1; with the order."""
    batches = held_out_batches(prepared.held, prepared.pad_id, batch_tokens=run.micro_batch_tokens or run.batch_tokens,
                               max_tokens=run.rank_tokens)
    probes = passkey_probes(prepared.tokenizer, context=run.probe_context) if probe or run.rank_by == "passkey" else None
    costs = layer_costs(model, batches, probes=probes, echo=echo)
    return {**costs, "by": run.rank_by, "order": rank(costs, run.rank_by),
            **({"probe_context": run.probe_context} if probes else {})}


def keep_costliest_layers(run: RunConfig, prepared, model, conversion, *, echo=print):
    """``softmax_auto``: rank the converted layers, then rebuild the model with the K costliest kept as softmax
    (their trained φ and γ dropped, the others' kept); returns (model, conversion, ranking)."""
    if distributed.world_size() > 1:
        raise ValueError("--softmax-layers auto:K runs in one process; rank first (lolcats rank-layers), then pass "
                         "the chosen layers to a distributed run")
    ranking = rank_converted_layers(run, prepared, model, echo=echo)
    count = softmax_count(run.softmax_auto, len(ranking["order"]))
    chosen = sorted(ranking["order"][:count])
    ranking["kept"] = chosen
    echo(f"keeping as softmax the {count} layer(s) whose linearization costs most ({run.rank_by}): {chosen}")
    conversion = conversion.model_copy(update={"softmax_layers": tuple(sorted({*conversion.softmax_layers, *chosen}))})
    trained = {name: p.detach() for name, p in transfer_parameters(model).items()}
    device = next(model.parameters()).device
    # (the base loads a second time: for a moment there are two copies of the weights)
    rebuilt = convert(load_base_model(run.model, dtype=run.torch_dtype()).to(device), conversion)
    for name, parameter in transfer_parameters(rebuilt).items():
        parameter.data.copy_(trained[name])
    prepared.model = rebuilt
    return rebuilt, conversion, ranking


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
