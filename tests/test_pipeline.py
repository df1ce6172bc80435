"""Stage 1/2 training, checkpoints, resume, NaN guard and artifacts on the tiny teacher the tests build
(tests/tiny_artifacts.py); what only a real model shows (how far stage 1 gets, published perplexities) on
stories260k from ../shared."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import lolcats
from lolcats.artifacts import ADAPTER, CONVERSION_BEFORE_OPTIONS, MANIFEST, ArtifactError, save_adapter
from lolcats.convert import set_attention_mode
from lolcats.data import IGNORE_INDEX, make_batches
from lolcats.evaluate import perplexity
from lolcats.training import linearize as linearize_module
from lolcats.training.config import RunConfig
from lolcats.training.linearize import linearize
from lolcats.training.prepare import prepare
from lolcats.training.loop import StageSettings, TrainingError, example_data, train_stage
from lolcats.convert import add_lora, lora_parameters
from lolcats.training.lora import lm_loss_fn
from lolcats.training.transfer import transfer_loss_fn, transfer_parameters

from conftest import tiny_examples


@pytest.fixture(scope="module")
def examples(tiny):
    return tiny_examples(tiny, 200, 256, 20)


def converted(path):
    # the default student with a window short enough for the 256-token rows to reach the linear term
    return lolcats.convert(lolcats.load_base_model(str(path)), window=32)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


def settings(name, tokens, lr, **kw):
    return StageSettings(name=name, tokens=tokens, lr=lr, batch_tokens=1024, warmup_steps=2, eval_every=4,
                         eval_tokens=2048, checkpoint_every=2, **kw)


def stage1(model, train, held, run_dir, tokens=12_000):
    stage = settings("stage1", tokens, 1e-2)
    return train_stage(transfer_parameters(model), transfer_loss_fn(model), example_data(train, held, stage, seed=0, pad_id=0),
                       stage, run_dir=run_dir, progress=False)


def test_stage1_trains_only_feature_maps_and_gamma_and_its_loss_falls(tiny, examples, tmp_path):
    train, held = examples
    model = converted(tiny.model)
    params = transfer_parameters(model)
    assert params and all(("feature_map_" in n) or n.endswith("window_logit") or ".decay_gate." in n for n in params)
    before = snapshot(model)
    result = stage1(model, train, held, tmp_path)
    assert changed(before, model) == set(params)
    log = [json.loads(line) for line in (tmp_path / "logs" / "stage1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, result.steps + 1))
    # the held-out distillation loss falls at every evaluation (on the tiny teacher its 13 steps end at 0.82x
    # the first; how far stage 1 gets on a real model: the stories260k test below)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert [r["step"] for r in log if "eval_loss" in r][0] == 0 and len(evals) >= 4  # before training, every 4 steps
    assert all(later < earlier for earlier, later in zip(evals, evals[1:]))
    assert result.first_eval_loss == evals[0] and result.best_eval_loss == evals[-1] < 0.9 * evals[0]


def test_stage2_trains_only_lora(tiny, examples, tmp_path):
    train, held = examples
    model = converted(tiny.model)
    set_attention_mode(model, "linear")
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    before = snapshot(model)
    params = lora_parameters(model)
    assert len(params) == model.config.num_hidden_layers * 4 * 2  # A and B of 4 projections in every layer
    stage = settings("stage2", 3000, 1e-3)
    train_stage(params, lm_loss_fn(model), example_data(train, held, stage, seed=0, pad_id=0), stage,
                run_dir=tmp_path, progress=False)
    assert changed(before, model) and changed(before, model) <= {n for n in params if "lora_B" in n or "lora_A" in n}
    assert all("feature_map" not in n and "window_logit" not in n for n in changed(before, model))


class Killed(Exception):
    pass


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(tiny, examples, tmp_path):
    train, held = examples
    stage = settings("stage1", 8000, 1e-2)

    def run(run_dir, kill_at=None, resume=False):
        model = converted(tiny.model)
        loss_fn = transfer_loss_fn(model)
        calls = {"n": 0}

        def maybe_killed(batch):
            calls["n"] += 1
            if kill_at is not None and calls["n"] == kill_at:
                raise Killed
            return loss_fn(batch)

        result = train_stage(transfer_parameters(model), maybe_killed, example_data(train, held, stage, seed=3, pad_id=0), stage,
                             run_dir=run_dir, resume=resume, progress=False)
        return result, {n: p.detach().clone() for n, p in transfer_parameters(model).items()}

    full, full_params = run(tmp_path / "full")
    # The 1st call is the initial evaluation over 2 held-out batches; call 8 is in the middle of training,
    # after the step-4 checkpoint and between evaluations.
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=8)
    resumed, resumed_params = run(tmp_path / "killed", resume=True)
    curve = lambda r: [(x["step"], x.get("loss"), x.get("eval_loss")) for x in r.history]  # noqa: E731
    assert len(curve(resumed)) == len(curve(full))
    for a, b in zip(curve(resumed), curve(full)):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            assert (x is None and y is None) or math.isclose(x, y, rel_tol=1e-5)
    for name in full_params:
        torch.testing.assert_close(resumed_params[name], full_params[name], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny, examples, tmp_path):
    train, held = examples
    model = converted(tiny.model)
    loss_fn = transfer_loss_fn(model)
    steps = {"n": 0}

    def poisoned(batch):
        loss = loss_fn(batch)
        if torch.is_grad_enabled():
            steps["n"] += 1
            if steps["n"] == 3:
                return loss * float("nan")
        return loss

    params = transfer_parameters(model)
    with pytest.raises(TrainingError, match=r"stage1: loss is nan at step 3.*last good checkpoint"):
        stage = settings("stage1", 10_000, 1e-2)
        train_stage(params, poisoned, example_data(train, held, stage, seed=0, pad_id=0), stage,
                    run_dir=tmp_path, progress=False)
    checkpoint = tmp_path / "checkpoints" / "stage1.safetensors"
    fresh = converted(tiny.model)
    from lolcats.training.checkpoints import load_trainer_checkpoint

    fresh_params = transfer_parameters(fresh)
    state = load_trainer_checkpoint(checkpoint, fresh_params, torch.optim.AdamW(fresh_params.values()))
    assert state["step"] == 2
    assert all(torch.isfinite(p).all() for p in fresh_params.values())


@pytest.fixture(scope="module")
def trained_dir(tiny, tmp_path_factory):
    """A whole linearize run, with the model it trained kept as it was saved (and then measured)."""
    out = tmp_path_factory.mktemp("run")
    # LoLCATs as published (no sinks, no gate, φ after RoPE): what an older manifest describes
    run = RunConfig(model=str(tiny.model), data=(str(tiny.train),), out=str(out), seq_len=256,
                    batch_tokens=1024, stage1_tokens=4000, stage2_tokens=2000, eval_tokens=1024, eval_every=2,
                    eval_text=(str(tiny.eval),), eval_max_tokens=1024, held_out=20, dtype="float32",
                    conversion={"window": 64, "sinks": 0, "gate": "none", "linear_rope": True})
    trained = []

    def keep_model(directory, model, manifest):
        trained.append(model)  # the in-memory model: linearize merges its LoRA in place, then measures it
        return save_adapter(directory, model, manifest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linearize_module, "save_adapter", keep_model)
        manifest = linearize(run, echo=lambda _: None, progress=False)
    return out, manifest, run, trained


def test_linearize_writes_a_manifest_and_adapter_that_load_back(trained_dir, tiny):
    out, manifest, _, _ = trained_dir
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["base_model"]["spec"] == str(tiny.model)
    assert set(saved["stages"]) == {"stage1", "stage2"}
    assert saved["lora"]["rank"] == 8 and saved["conversion"]["attention"] == "lolcats"
    assert {"torch", "transformers", "peft", "lolcats"} <= set(saved["versions"])
    teacher = lolcats.load_base_model(str(tiny.model))
    assert len(saved["metrics"]["layers"]) == teacher.config.num_hidden_layers and saved["metrics"]["perplexity"]
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER), "pt") as f:
        names = list(f.keys())
    assert names and all(("feature_map" in n) or ("window_logit" in n) or ("lora_" in n) for n in names)
    model = lolcats.load(out)
    ids = torch.tensor([[1, 403, 407, 261, 378] * 30])
    logits = model(input_ids=ids, use_cache=False).logits
    unmerged = lolcats.load(out, merge=False)
    torch.testing.assert_close(unmerged(input_ids=ids, use_cache=False).logits, logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(teacher(input_ids=ids).logits, logits, atol=1e-3)


def test_a_manifest_from_before_the_student_options_loads_without_them(trained_dir, tmp_path):
    out, _, _, _ = trained_dir
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / MANIFEST).read_text())
    for option in CONVERSION_BEFORE_OPTIONS:
        manifest["conversion"].pop(option)
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded = lolcats.load(old)
    assert {option: getattr(loaded.lolcats_config, option) for option in CONVERSION_BEFORE_OPTIONS} == \
        CONVERSION_BEFORE_OPTIONS
    ids = torch.tensor([[1, 403, 407, 261, 378] * 30])
    torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits,
                               lolcats.load(out)(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


def test_the_loaded_artifact_is_the_model_the_run_trained(trained_dir, tiny):
    """lolcats.load(out) rebuilds, bit for bit, the model linearize trained and measured in memory."""
    out, _, _, trained = trained_dir
    assert len(trained) == 1, "linearize no longer saves through save_adapter(directory, model, manifest): update keep_model"
    trained = trained[0]
    loaded = lolcats.load(out)
    assert type(loaded) is type(trained)
    expected, got = trained.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    tokenizer = lolcats.load_tokenizer(str(tiny.model))
    ids = tokenizer(tiny.eval.read_text()[:2000], return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] > 2 * loaded.lolcats_config.window  # the linear term is in use
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, trained(ids, use_cache=False).logits)


@torch.no_grad()
def held_out_perplexity(model, held, pad_id, batch_tokens, max_tokens):
    """The manifest's held-out perplexity, recomputed from the model's own logits: exp(mean NLL) over the label
    tokens of the held-out batches, batch by batch until ``max_tokens`` labels are scored."""
    nll, count = 0.0, 0
    for batch in make_batches(held, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
        if count >= max_tokens:
            break
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        labels = batch.labels[:, 1:]
        nll += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / count)


def test_the_manifest_perplexities_reproduce(trained_dir, tiny):
    """Teacher and linearized perplexity, on the held-out split and on --eval-text, recomputed from the teacher
    (prepare) and from lolcats.load(out): the manifest's numbers to 1e-5."""
    out, _, run, _ = trained_dir
    rows = json.loads((out / MANIFEST).read_text())["metrics"]["perplexity"]
    assert set(rows) == {"held-out split", str(tiny.eval)}
    prepared = prepare(run, echo=lambda _: None)  # the teacher and the run's held-out examples
    models = {"teacher": prepared.model, "linearized": lolcats.load(out)}
    for who, model in models.items():
        held = held_out_perplexity(model, prepared.held, prepared.pad_id, run.batch_tokens, run.eval_tokens)
        assert held == pytest.approx(rows["held-out split"][who], rel=1e-5), who
        text = perplexity(model, prepared.tokenizer, tiny.eval, seq_len=run.seq_len, protocol=run.eval_protocol,
                          max_tokens=run.eval_max_tokens)
        assert text.ppl == pytest.approx(rows[str(tiny.eval)][who], rel=1e-5), who
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["linearized"] / row["teacher"], rel=1e-12)
        assert row["teacher"] != pytest.approx(row["linearized"], rel=1e-4)  # two models, two numbers
        assert 1 < row["teacher"] < 8  # the tiny teacher has learned its corpus (a uniform guess: 512)


def test_loading_onto_the_wrong_base_or_a_damaged_adapter_fails_clearly(trained_dir, tiny, tmp_path):
    out = trained_dir[0]
    other = tmp_path / "other"
    shutil.copytree(tiny.model, other)
    model = lolcats.load_base_model(str(other))
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(1.01)
    model.save_pretrained(other)
    with pytest.raises(ArtifactError, match="fingerprint mismatch"):
        lolcats.load(out, base_model=str(other))

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    data = (damaged / ADAPTER).read_bytes()
    (damaged / ADAPTER).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        lolcats.load(damaged)

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / ADAPTER))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(damaged / ADAPTER))
    with pytest.raises(ArtifactError, match="missing"):
        lolcats.load(damaged)


def test_eval_with_a_recall_cache_on_a_trained_run(trained_dir, tiny):
    """`lolcats eval --recall-cache K` on a linearized folder: the setting is applied and recorded and changes the
    perplexity (past the window); a base model has no linear state to give one."""
    from lolcats.evaluate.runner import evaluate_model

    out = str(trained_dir[0])
    settings = dict(texts=[tiny.eval], tasks=[], seq_len=256, max_text_tokens=1024, with_fidelity=False,
                    echo=lambda _: None)
    plain = evaluate_model(out, **settings)
    recalled = evaluate_model(out, recall_cache=8, **settings)
    assert recalled["settings"]["recall_cache"] == 8 and "recall_cache" not in plain["settings"]
    assert recalled["perplexity"] != plain["perplexity"]
    assert evaluate_model(out, recall_cache=0, **settings)["perplexity"] == plain["perplexity"]
    with pytest.raises(ValueError, match="recall cache is for a linearized folder"):
        evaluate_model(str(tiny.model), recall_cache=8, **settings)


def test_cli_bench_cache_with_a_recall_cache(trained_dir, tiny, tmp_path):
    """`lolcats bench cache --recall-cache K`: the cache of a linearized folder grows by a constant with K, and stays
    the same at every context; `--baselines`: the training-free rows' caches; a base model is refused either way."""
    from typer.testing import CliRunner

    from lolcats.cli import app

    def measure(*extra):
        out = tmp_path / f"cache{len(extra)}.json"
        result = CliRunner().invoke(app, ["bench", "cache", "--model", str(trained_dir[0]), "--contexts", "300,3000",
                                          "--no-teacher", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    plain, recalled = measure(), measure("--recall-cache", "16")
    assert recalled["recall_cache"] == 16 and plain["recall_cache"] is None
    assert plain["model"][0] == plain["model"][1] < recalled["model"][0] == recalled["model"][1]
    # the training-free rows hold the window's keys and values (and the sinks') but no linear state: constant,
    # and below the linearized model's cache
    rows = measure("--baselines", "window,sinks")
    assert rows["window"][0] == rows["window"][1] < rows["sinks"][0] == rows["sinks"][1] < plain["model"][0]
    refused = CliRunner().invoke(app, ["bench", "cache", "--model", str(tiny.model), "--recall-cache", "4"])
    assert refused.exit_code != 0 and "linearized folder" in refused.output
    refused = CliRunner().invoke(app, ["bench", "cache", "--model", str(tiny.model), "--baselines", "sinks"])
    assert refused.exit_code != 0 and "needs a linearized folder" in refused.output
