"""Choosing the softmax layers by measurement: `lolcats rank-layers`, `--softmax-layers auto:K` and the cache bytes
each choice costs (training/ranking.py, cli/bench.py)."""

import json
import shutil

import pytest
import torch
from tiny_models import tiny_model
from typer.testing import CliRunner

import lolcats
from lolcats import convert, linearized_layers
from lolcats.cli import app
from lolcats.cli.bench import cache_bytes_by_context
from lolcats.evaluate.report import build_report
from lolcats.runtime.cache import cache_nbytes
from lolcats.training.config import RunConfig
from lolcats.training.linearize import linearize, rank_layers
from lolcats.training.ranking import layer_costs, rank, softmax_count


def run_settings(tiny, out, **overrides):
    settings = dict(model=str(tiny.model), data=(str(tiny.train),), out=str(out), dtype="float32", seq_len=256,
                    batch_tokens=1024, stage1_tokens=4096, stage2_tokens=0, rank_tokens=2048, eval_every=100,
                    checkpoint_every=100, warmup_steps=1, conversion={"window": 16})
    return RunConfig(**{**settings, **overrides})


def test_rank_puts_the_costliest_first_and_breaks_ties_by_layer():
    costs = {"layers": [{"layer": 0, "kl": 0.1}, {"layer": 1, "kl": 0.3}, {"layer": 2, "kl": 0.1}, {"layer": 3, "kl": 0.2}]}
    assert rank(costs) == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="passkey_nll"):
        rank(costs, "passkey")
    with pytest.raises(ValueError, match="unknown ranking"):
        rank(costs, "perplexity")


def test_softmax_count_takes_a_count_or_a_fraction():
    assert softmax_count(3, 24) == 3
    assert softmax_count(0.25, 24) == 6
    with pytest.raises(ValueError, match="whole number"):
        RunConfig(out="x", softmax_auto=2.5)
    with pytest.raises(ValueError, match="more layers than"):
        softmax_count(5, 4)


def test_ranking_is_deterministic_for_a_seed(tiny, tmp_path):
    first = rank_layers(run_settings(tiny, tmp_path / "a"), echo=lambda line: None, progress=False)
    second = rank_layers(run_settings(tiny, tmp_path / "b"), echo=lambda line: None, progress=False)
    assert first["layers"] == second["layers"] and first["order"] == second["order"]
    assert sorted(first["order"]) == [0, 1, 2, 3] and first["tokens"] > 0
    assert all(row["kl"] > 0 for row in first["layers"])  # 256-token rows reach past a 16-token window
    saved = json.loads((tmp_path / "a" / "ranking.json").read_text())
    assert saved["order"] == first["order"] and saved["by"] == "kl"


def test_a_layer_whose_window_covers_the_rows_costs_nothing(tiny):
    """Rows no longer than two windows are exact softmax in the student: every layer's KL is zero."""
    from conftest import tiny_examples
    from lolcats.data import make_batches

    _, held = tiny_examples(tiny, documents=20, seq_len=32, held_out=4)
    model = convert(lolcats.load_base_model(str(tiny.model), dtype=torch.float32), window=16)
    batches = make_batches(held, batch_tokens=512, seed=0, epoch=0, pad_id=0)
    costs = layer_costs(model, batches, echo=lambda line: None)
    assert [row["layer"] for row in costs["layers"]] == [0, 1, 2, 3]
    assert all(abs(row["kl"]) < 1e-6 for row in costs["layers"])


def test_auto_keeps_exactly_the_k_costliest_layers_as_exact_softmax(tiny, tmp_path):
    out = tmp_path / "auto"
    manifest = linearize(run_settings(tiny, out, softmax_auto=2, stage2_tokens=1024), echo=lambda line: None,
                         progress=False)
    ranking = manifest["layer_ranking"]
    kept = sorted(ranking["order"][:2])
    assert ranking["kept"] == kept and list(manifest["conversion"]["softmax_layers"]) == kept
    model = lolcats.load(out, dtype=torch.float32)
    assert sorted(layer.layer_idx for layer in linearized_layers(model)) == sorted(set(range(4)) - set(kept))

    # a kept layer's attention, given the inputs it sees in the mixed model, returns exactly the teacher layer's
    teacher = lolcats.load_base_model(str(tiny.model), dtype=torch.float32)
    captured = {}

    def capture(module, args, kwargs, output):
        captured["args"], captured["kwargs"], captured["output"] = args, kwargs, output[0]

    ids = torch.randint(1, 200, (1, 96), generator=torch.Generator().manual_seed(0))
    for index in kept:
        handle = model.model.layers[index].self_attn.register_forward_hook(capture, with_kwargs=True)
        with torch.no_grad():
            model(ids, use_cache=False)
            expected = teacher.model.layers[index].self_attn(*captured["args"], **captured["kwargs"])[0]
        handle.remove()
        assert torch.equal(captured["output"], expected)

    # generation: decoding with the mixed cache (KV for kept layers, recurrent states for the rest) == full forward
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out_prefill = model(ids[:, :40], use_cache=True)
        cache, steps = out_prefill.cache, [out_prefill.logits]
        for t in range(40, 96):
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache, steps = step.cache, steps + [step.logits]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4 * full.abs().max()
    assert [type(layer).__name__ == "RecurrentLayer" for layer in cache.layers] == [i not in kept for i in range(4)]

    page = build_report(out).read_text()
    assert "Layer ranking" in page and page.count(">kept</td>") == 2


def prefilled_cache_bytes(model, contexts):
    """The generation cache's bytes after a real prefill of each context (batch 1)."""
    measured = []
    for context in contexts:
        ids = torch.randint(1, 96, (1, context), generator=torch.Generator().manual_seed(context))
        with torch.no_grad():
            measured.append(cache_nbytes(model(ids, use_cache=True).cache))
    return measured


@pytest.mark.parametrize("family, kept", [("llama", (1,)), ("gemma3_text", ())])
def test_cache_bytes_by_context_match_a_real_prefill(family, kept):
    """The prediction from one short prefill equals the cache a real prefill leaves, for full and sliding softmax
    layers (below and beyond their window) beside recurrent ones."""
    overrides = {"sliding_window": 64} if family == "gemma3_text" else {}
    model = convert(tiny_model(family, **overrides), window=4, chunk_size=4, softmax_layers=kept)
    contexts = [20, 63, 100, 300]
    predicted = cache_bytes_by_context(model, contexts, probe=40)
    measured = prefilled_cache_bytes(model, contexts)
    assert predicted == measured
    assert predicted[1] > predicted[0]  # softmax layers grow with the context
    if family == "gemma3_text":  # only sliding layers keep keys: nothing grows past their window
        assert predicted[-1] == predicted[-2]
    else:
        assert predicted[-1] > predicted[-2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_with_a_recall_cache_are_constant_and_match_a_real_prefill(dtype):
    """A recall cache adds K keys, values (in the model's dtype), φ(k) (fp32), positions and decays per query head
    and layer, whatever the context: the one-probe prediction equals real prefills, and the extra bytes do not grow."""
    model = convert(tiny_model("llama"), window=4, chunk_size=4, recall_cache=3).to(dtype)
    plain = convert(tiny_model("llama"), window=4, chunk_size=4).to(dtype)
    plain.load_state_dict(model.state_dict())
    contexts = [20, 100, 300]
    predicted = cache_bytes_by_context(model, contexts, probe=40)
    measured = prefilled_cache_bytes(model, contexts)
    assert predicted == measured and len(set(predicted)) == 1
    extra = predicted[0] - cache_bytes_by_context(plain, contexts[:1], probe=40)[0]
    layers = list(linearized_layers(model))
    layer = layers[0]
    per_key = 2 * layer.head_dim * dtype.itemsize + layer.feature_map_k.output_dim * 4 + 8 + 4
    assert extra == len(layers) * layer.num_heads * 3 * per_key


def test_cli_rank_layers_and_auto_flag(tiny, tmp_path):
    out = tmp_path / "ranked"
    result = CliRunner().invoke(app, ["rank-layers", "--model", str(tiny.model), "--data", str(tiny.train),
                                      "--out", str(out), "--tokens", "2048", "--rank-tokens", "1024", "--seq-len",
                                      "128", "--window", "16", "--dtype", "float32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((out / "ranking.json").read_text())["order"]) == [0, 1, 2, 3]
    assert "rank  layer" in result.output
    for bad in ("auto:0", "auto:x", "auto:2.5"):
        result = CliRunner().invoke(app, ["linearize", "--model", str(tiny.model), "--data", str(tiny.train),
                                          "--out", str(tmp_path / "bad"), "--softmax-layers", bad])
        assert result.exit_code != 0 and "auto:K" in result.output, (bad, result.output)
        assert not (tmp_path / "bad").exists()


def test_rank_from_a_run_uses_its_stage1_features_without_its_lora(tiny, tmp_path):
    """`rank-layers --from RUN`: no training; the KL of each layer is that of the run's stage-1 φ and γ on the frozen
    base (LoRA dropped), on the run's held-out split; the run's files are left as they were."""
    from lolcats.convert import merge_lora
    from lolcats.training.linearize import rank_layers_from_run
    from lolcats.training.prepare import prepare
    from lolcats.training.ranking import held_out_batches

    out = tmp_path / "run"
    run = run_settings(tiny, out, stage2_tokens=1024)
    linearize(run, echo=lambda line: None, progress=False)
    manifest_bytes, adapter_bytes = (out / "lolcats.json").read_bytes(), (out / "adapter.safetensors").read_bytes()

    ranked = rank_layers_from_run(out, {}, echo=lambda line: None)
    assert (out / "lolcats.json").read_bytes() == manifest_bytes
    assert (out / "adapter.safetensors").read_bytes() == adapter_bytes
    saved = json.loads((out / "ranking.json").read_text())
    assert saved["order"] == ranked["order"] and saved["from_run"] == str(out) and saved["stage1"]["tokens"] > 0

    prepared = prepare(run, echo=lambda line: None)
    batches = held_out_batches(prepared.held, prepared.pad_id, batch_tokens=run.batch_tokens, max_tokens=run.rank_tokens)
    stage1_only = lolcats.load(out, merge=False, dtype=torch.float32)
    merge_lora(stage1_only, merge=False)
    expected = layer_costs(stage1_only, batches, echo=lambda line: None)
    assert [row["kl"] for row in ranked["layers"]] == pytest.approx([row["kl"] for row in expected["layers"]], rel=1e-5)
    with_lora = layer_costs(lolcats.load(out, dtype=torch.float32), batches, echo=lambda line: None)
    assert [row["kl"] for row in with_lora["layers"]] != pytest.approx([row["kl"] for row in expected["layers"]], rel=1e-3)

    result = CliRunner().invoke(app, ["rank-layers", "--from", str(out), "--window", "8"])
    assert result.exit_code != 0 and "drop --window" in result.output
    result = CliRunner().invoke(app, ["rank-layers", "--from", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "missing" in result.output
    result = CliRunner().invoke(app, ["rank-layers", "--from", str(out), "--out", str(tmp_path / "again"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "again" / "ranking.json").read_text())["order"] == ranked["order"]


def test_stage1_from_a_run_reuses_its_feature_maps_for_another_choice_of_softmax_layers(tiny, tmp_path):
    """`--stage1-from RUN`: no stage-1 training; every layer still linear gets the run's φ, γ and gate exactly; with the
    same layers and no stage 2 the model is the run's; a different conversion, a layer the run never trained, or
    another base is refused before anything is written."""
    from lolcats.artifacts import read_tensors
    from lolcats.training.transfer import transfer_parameters

    source = tmp_path / "source"
    linearize(run_settings(tiny, source), echo=lambda line: None, progress=False)
    saved, _ = read_tensors(source / "adapter.safetensors")

    same = tmp_path / "same"
    manifest = linearize(run_settings(tiny, same, stage1_from=str(source)), echo=lambda line: None, progress=False)
    assert manifest["stages"]["stage1"]["from_run"] == str(source) and not (same / "logs" / "stage1.jsonl").exists()
    ids = torch.randint(1, 200, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lolcats.load(same, dtype=torch.float32)(ids).logits,
                           lolcats.load(source, dtype=torch.float32)(ids).logits)

    hybrid = tmp_path / "hybrid"
    manifest = linearize(run_settings(tiny, hybrid, stage1_from=str(source), stage2_tokens=1024,
                                      conversion={"window": 16, "softmax_layers": (1,)}),
                         echo=lambda line: None, progress=False)
    assert list(manifest["conversion"]["softmax_layers"]) == [1] and manifest["stages"]["stage2"]["tokens"] > 0
    reused = transfer_parameters(lolcats.load(hybrid, dtype=torch.float32))
    assert reused and not any(".layers.1." in name for name in reused)
    assert all(torch.equal(parameter, saved[name]) for name, parameter in reused.items())

    with pytest.raises(ValueError, match="window 16 there, 8 here"):
        linearize(run_settings(tiny, tmp_path / "bad", stage1_from=str(source), conversion={"window": 8}),
                  echo=lambda line: None, progress=False)
    with pytest.raises(ValueError, match=r"kept layers \[1\] as softmax"):
        linearize(run_settings(tiny, tmp_path / "bad", stage1_from=str(hybrid)), echo=lambda line: None, progress=False)
    other = tmp_path / "other-base"
    shutil.copytree(source, other)
    manifest = json.loads((other / "lolcats.json").read_text())
    manifest["base_model"]["weights_sha256"] = "0" * 64
    (other / "lolcats.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another base model"):
        linearize(run_settings(tiny, tmp_path / "bad", stage1_from=str(other)), echo=lambda line: None, progress=False)
    assert not (tmp_path / "bad" / "lolcats.json").exists()
