"""`lolcats eval --position-buckets` (evaluate/positions.py) and `--baselines window,sinks` (evaluate/runner.py), on tiny
random models: the buckets partition the scored positions and their token-weighted mean is the perplexity code's
nll over the same windows; a window baseline whose window covers the sequence is the teacher."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import teacher_or_linearized, tiny_model
from typer.testing import CliRunner

import lolcats
import lolcats.next_token
from lolcats.cli import app
from lolcats.config import LinearizeConfig
from lolcats.evaluate.perplexity import next_token_nll, window_batches
from lolcats.evaluate.positions import (bucket_edges, default_edges, loss_by_position, nll_by_position,
                                        parse_edges, position_windows)
from lolcats.evaluate.runner import evaluate_model, format_table, parse_baselines

TEXT = ("The dog ran to the park, and the bird sang a song about the rain and the wind and the sea. " * 6
        + "Tom had a red ball. She said hello to her friend and they played together until dinner. " * 4)


class CharTokenizer:
    """One token a character (ids 3..95 of the tiny models' 96), BOS = 1 (as tests/test_perplexity.py)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, **_):
        ids = [3 + ord(c) % 93 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def stream():
    return [CharTokenizer.bos_token_id] + CharTokenizer()(TEXT)["input_ids"]


@pytest.fixture(scope="module", params=["teacher", "linearized"])
def model(request):
    return teacher_or_linearized(request.param)


def test_default_edges_double_up_to_the_sequence_length():
    assert default_edges(8192) == [0, 64, 128, 512, 1024, 2048, 4096, 8192]
    assert default_edges(3000) == [0, 64, 128, 512, 1024, 2048, 3000]
    assert default_edges(100) == [0, 64, 100] and default_edges(64) == [0, 64] and default_edges(16) == [0, 16]
    assert bucket_edges(1024, [64, 128, 512]) == [0, 64, 128, 512, 1024]
    assert bucket_edges(256, [0, 64, 4096]) == [0, 64, 256]
    assert parse_edges("64,128, 512") == [64, 128, 512]
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_edges(1024, [128, 64])
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_edges("64,abc")


@pytest.mark.parametrize("chunk_elements", [None, 96 * 7], ids=["one-chunk", "7-row-chunks"])
def test_bucket_means_weighted_by_tokens_are_the_perplexity_nll(model, chunk_elements, monkeypatch):
    if chunk_elements:
        monkeypatch.setattr(lolcats.next_token, "CHUNK_ELEMENTS", chunk_elements)
    seq_len = 100
    ids = stream()
    windows = position_windows(ids, seq_len)
    assert [len(tokens) for tokens, _ in windows][:-1] == [seq_len] * (len(windows) - 1)
    assert sum(len(tokens) for tokens, _ in windows) == len(ids)  # non-overlapping, all of the text
    total, count = next_token_nll(model, window_batches(windows, 3))
    result = loss_by_position(model, ids, seq_len=seq_len, edges=[8, 32, 64], batch_size=3)
    assert result["edges"] == [0, 8, 32, 64, 100] and result["seq_len"] == seq_len
    assert result["windows"] == len(windows)
    # the buckets partition the scored positions: every predicted token once
    assert sum(result["tokens"]) == count == len(ids) - len(windows)
    weighted = sum(loss * tokens for loss, tokens in zip(result["mean_loss"], result["tokens"])) / count
    assert weighted == pytest.approx(total / count, rel=1e-6, abs=1e-6)


@torch.no_grad()
def test_per_position_losses_are_the_full_logits_cross_entropy(model):
    ids = torch.tensor(stream()[:40])
    sums, counts = nll_by_position(model, window_batches([(ids, 1)], 1), 40)
    logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    assert counts[0] == 0 and bool((counts[1:] == 1).all())
    torch.testing.assert_close(sums[1:].float(), expected, rtol=1e-5, atol=1e-5)
    # bucket i holds the positions edges[i] <= t < edges[i + 1]
    result = loss_by_position(model, ids, seq_len=40, edges=[10])
    assert result["tokens"] == [9, 30]
    assert result["mean_loss"][0] == pytest.approx(float(expected[:9].mean()), rel=1e-5)


def test_window_baseline_covering_the_sequence_is_the_teacher():
    teacher = tiny_model("llama", seed=2)
    ids = torch.tensor(stream()[:48])
    windows = [(ids, 1)]
    expected = next_token_nll(teacher, window_batches(windows, 1))
    exact = lolcats.convert(tiny_model("llama", seed=2), attention="window", window=48, sinks=0)
    small = lolcats.convert(tiny_model("llama", seed=2), attention="window", window=4, sinks=0)
    assert next_token_nll(exact, window_batches(windows, 1))[0] == pytest.approx(expected[0], rel=1e-5)
    assert abs(next_token_nll(small, window_batches(windows, 1))[0] - expected[0]) > 1e-3 * expected[0]
    by_position = [loss_by_position(m, ids, seq_len=48, edges=[8]) for m in (teacher, exact, small)]
    assert by_position[1]["mean_loss"] == pytest.approx(by_position[0]["mean_loss"], rel=1e-5)
    # inside the first block of the terrace window (positions < 8 with window 4 see up to 2 blocks) nothing differs
    assert by_position[2]["mean_loss"][0] == pytest.approx(by_position[0]["mean_loss"][0], rel=1e-5)
    assert by_position[2]["mean_loss"][1] != pytest.approx(by_position[0]["mean_loss"][1], rel=1e-3)


def test_sinks_baseline_keeps_the_first_tokens_in_softmax():
    """window + sinks: exact where the window covers the sequence; past it, the first tokens are still attended
    with softmax, so the loss differs from the window alone."""
    teacher = tiny_model("llama", seed=2)
    ids = torch.tensor(stream()[:48])
    windows = [(ids, 1)]
    expected = next_token_nll(teacher, window_batches(windows, 1))[0]
    exact = lolcats.convert(tiny_model("llama", seed=2), attention="window", window=48, sinks=4)
    assert next_token_nll(exact, window_batches(windows, 1))[0] == pytest.approx(expected, rel=1e-5)
    small = lolcats.convert(tiny_model("llama", seed=2), attention="window", window=4, sinks=0)
    sinks = lolcats.convert(tiny_model("llama", seed=2), attention="window", window=4, sinks=4)
    window_only, with_sinks = (next_token_nll(m, window_batches(windows, 1))[0] for m in (small, sinks))
    assert abs(with_sinks - window_only) > 1e-3 * window_only


def test_baselines_of_a_gated_run_or_a_recall_cache_run_are_the_plain_window(tiny, tmp_path):
    """The window rows of a run with a decay gate or a recall cache keep its window and drop what acts on the
    (absent) linear term. They keep the run's softmax layers, so a hybrid run has a training-free counterpart with
    the same exact layers."""
    from lolcats.evaluate.runner import baseline_model
    from lolcats.runtime.swap import LinearizedAttention
    from lolcats.training.config import RunConfig
    from lolcats.training.linearize import linearize

    for option in ({"gate": "scalar", "softmax_layers": (1,)}, {"gate": "none", "recall_cache": 2}):
        out = tmp_path / next(iter(option))
        linearize(RunConfig(model=str(tiny.model), data=(str(tiny.train),), out=str(out), dtype="float32", seq_len=128,
                            batch_tokens=512, stage1_tokens=512, stage2_tokens=0, eval_every=100, checkpoint_every=100,
                            conversion={"window": 16, **option}),
                  echo=lambda line: None, progress=False)
        for name, sinks in (("window", 0), ("sinks", 4)):
            baseline = baseline_model(str(out), name)
            layers = list(lolcats.linearized_layers(baseline))
            assert layers and all(not layer.use_linear and layer.decay_gate is None and layer.recall == 0
                                  for layer in layers)
            assert all(layer.window.size == 16 and layer.window.sinks == sinks for layer in layers)
            kept = [i for i, block in enumerate(baseline.model.layers)
                    if not isinstance(block.self_attn, LinearizedAttention)]
            assert kept == list(option.get("softmax_layers", ()))


def test_unknown_baseline_names_the_known_ones():
    assert parse_baselines("window,sinks") == ["window", "sinks"] and parse_baselines(None) == []
    with pytest.raises(ValueError, match="unknown baseline 'landmarks'; known: teacher, window, sinks"):
        parse_baselines("window,landmarks")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer, saved as a Hugging Face folder (a base model spec)."""
    tiny_artifacts = pytest.importorskip("tiny_artifacts")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_artifacts.build_tokenizer([TEXT] * 4)
    tokenizer.save_pretrained(folder)
    tiny_model("llama", seed=3, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return folder


def test_eval_without_the_new_flags_keeps_its_keys(saved_model, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 3)
    result = evaluate_model(str(saved_model), texts=[text], tasks=[], seq_len=64, echo=lambda line: None)
    assert set(result) == {"model", "kind", "perplexity", "tasks", "settings"}
    assert set(result["settings"]) == {"seq_len", "stride", "max_text_tokens", "limit", "num_fewshot", "batch_size"}
    assert "loss pos" not in format_table(result) and format_table(result).splitlines()[2].split() == ["metric", "value"]


def test_eval_command_reports_position_buckets_and_the_window_baseline(saved_model, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(saved_model), "--text", str(text), "--task-dir", str(tmp_path), "--seq-len", "96",
        "--position-buckets",
        "--baselines", "window,sinks", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    buckets = data["loss_by_position"]
    assert buckets["edges"] == [0, 64, 96] and buckets["seq_len"] == 96 and buckets["windows"] >= 2
    assert len(buckets["mean_loss"]) == len(buckets["tokens"]) == 2 and all(math.isfinite(x) for x in buckets["mean_loss"])
    window = data["baselines"]["window"]
    assert window["window"] == LinearizeConfig().window and window["sinks"] == 0 and data["baselines"]["sinks"]["sinks"] == 4
    assert set(window) >= {"perplexity", "tasks", "loss_by_position"}
    assert set(window["perplexity"]) == set(data["perplexity"]) == {"long.txt"}
    assert window["loss_by_position"]["edges"] == buckets["edges"]
    # positions < 64 are inside the first block of the 64-token terrace window: the baseline is exact there
    assert window["loss_by_position"]["mean_loss"][0] == pytest.approx(buckets["mean_loss"][0], rel=1e-4)
    # (and every position < 128 is: here both baselines are the teacher)
    assert data["baselines"]["sinks"]["perplexity"]["long.txt"] == pytest.approx(data["perplexity"]["long.txt"], rel=1e-4)
    table = result.output.split("metric")[1]
    assert "loss pos 0-64" in table and "loss pos 64-96" in table
    assert table.splitlines()[0].split() == ["value", "window", "sinks"]

    result = CliRunner().invoke(app, ["eval", "--model", str(saved_model), "--text", str(text), "--task-dir",
                                      str(tmp_path), "--seq-len", "96",
                                      "--position-edges", "16,32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["loss_by_position"]["edges"] == [0, 16, 32, 96]

    result = CliRunner().invoke(app, ["eval", "--model", str(saved_model), "--text", str(text), "--baselines", "sink"])
    assert result.exit_code == 2 and "known: teacher, window, sinks" in result.output
