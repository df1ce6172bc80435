import pytest
from typer.testing import CliRunner

from lolcats.cli import app

runner = CliRunner()


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert commands == {"convert", "linearize", "rank-layers", "export", "generate", "eval", "lm-eval", "report"}
    assert sorted(group.name for group in app.registered_groups) == ["bench", "blockwise"]
    for name in commands | {"bench", "blockwise"}:
        assert name in result.output


def test_convert_reports_on_the_tiny_teacher(tiny, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("window: 32\nfeature_map: t2r\n")
    result = runner.invoke(app, ["convert", "--model", str(tiny.model), "--config", str(config), "--seq-len", "200"])
    assert result.exit_code == 0, result.output
    assert "converted layers [0, 1, 2, 3]" in result.output
    assert "feature map t2r, window 32" in result.output
    exactness = float(result.output.split("to ")[1].split(" relative")[0])
    assert exactness <= 1e-5


def test_convert_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["convert", "--model", str(tmp_path / "nothing.gguf")])
    assert result.exit_code == 2
    assert "no GGUF file" in result.output
    config = tmp_path / "bad.yaml"
    config.write_text("windw: 32\n")
    result = runner.invoke(app, ["convert", "--model", str(tmp_path), "--config", str(config)])
    assert result.exit_code == 2 and "windw" in result.output
    for command in (["eval", "--text", str(tmp_path / "x.txt")], ["generate", "--prompt", "x"], ["bench", "cache"]):
        result = runner.invoke(app, [*command, "--model", str(tmp_path / "runs" / "typo")])
        assert result.exit_code == 2 and "no model folder or .gguf file at" in result.output, (command, result.output)


def test_rows_that_never_reach_the_linear_term_are_refused_before_anything_runs(tiny, tmp_path):
    out = tmp_path / "short"
    result = runner.invoke(app, ["linearize", "--model", str(tiny.model), "--data", str(tiny.train), "--out", str(out),
                                 "--seq-len", "256", "--window", "128"])
    assert result.exit_code != 0 and "never reaches the linear term" in result.output and "--window" in result.output
    assert not out.exists()


def test_linearize_runs_end_to_end_from_the_command_line(tiny, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("batch_tokens: 1024\neval_tokens: 1024\neval_every: 2\nheld_out: 10\neval_max_tokens: 1024\n")
    result = runner.invoke(app, [
        "linearize", "--model", str(tiny.model), "--data", str(tiny.train),
        "--eval-text", str(tiny.eval), "--out", str(out), "--config", str(config),
        "--seq-len", "128", "--window", "32", "--stage1-tokens", "3000", "--stage2-tokens", "1000", "--lora-rank", "4",
        "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "perplexity on eval.txt: teacher" in result.output
    import json

    manifest = json.loads((out / "lolcats.json").read_text())
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "dropout": 0.0}
    assert manifest["run"]["seq_len"] == 128 and manifest["stages"]["stage1"]["tokens"] >= 3000


def test_run_config_nests_the_conversion_and_flat_flags_reach_every_field(tmp_path):
    from lolcats.cli.linearize import run_config
    from lolcats.config import LinearizeConfig

    config = tmp_path / "run.yaml"
    config.write_text("model: m\nout: o\nconversion:\n  window: 16\n  feature_map: t2r\n  gamma_init: 0.3\n")
    run = run_config(str(config), {"chunk_size": 8, "softmax_layers": [2, 0], "local_layers": "linearize"})
    assert run.conversion == LinearizeConfig(window=16, feature_map="t2r", gamma_init=0.3, chunk_size=8,
                                             softmax_layers=(0, 2), local_layers="linearize")
    # every conversion field is a flag of `lolcats linearize`
    result = runner.invoke(app, ["linearize", "--help"])
    flags = result.output.replace("\n", " ")
    for field in LinearizeConfig.model_fields:
        assert "--" + field.replace("_", "-") in flags, field
    misplaced = tmp_path / "flat.yaml"
    misplaced.write_text("model: m\nout: o\nwindow: 16\n")
    with pytest.raises(ValueError, match="window: conversion settings go under `conversion:`"):
        run_config(str(misplaced), {})
    result = runner.invoke(app, ["linearize", "--model", "m", "--softmax-layers", "1,x"])
    assert result.exit_code == 2 and "--softmax-layers takes comma-separated layer indices" in result.output


def test_linearize_errors_are_one_line_without_traceback(tiny, tmp_path):
    result = runner.invoke(app, ["linearize", "--model", str(tiny.model), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data is required" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    result = runner.invoke(app, ["linearize", "--model", str(tiny.model), "--data", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output
    result = runner.invoke(app, ["linearize", "--config", "no-such-recipe", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "packaged recipe" in result.output


def test_blockwise_phases_from_the_command_line(tiny, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny.model}\ndata: [{tiny.train}]\n"
                      "seq_len: 128\nconversion: {window: 32}\nbatch_tokens: 512\neval_tokens: 512\nheld_out: 8\nstage1_tokens: 1000\n")
    common = ["--config", str(config), "--out", str(out), "--block-size", "3"]
    result = runner.invoke(app, ["blockwise", "collect", *common])
    assert result.exit_code == 0, result.output
    assert "x 2 bytes x 2 block inputs" in result.output  # layers 0-2 and 3
    result = runner.invoke(app, ["blockwise", "stitch", *common])
    assert result.exit_code == 2 and "not trained yet" in result.output and "blockwise train --block 0" in result.output
    for block in ("0", "1"):
        result = runner.invoke(app, ["blockwise", "train", "--block", block, "--quiet", *common])
        assert result.exit_code == 0, result.output
        assert f"block {block} (layers" in result.output
    result = runner.invoke(app, ["blockwise", "stitch", *common])
    assert result.exit_code == 0, result.output
    assert (out / "blockwise" / "stage1.safetensors").is_file()
    result = runner.invoke(app, ["blockwise", "train", "--block", "0", *common[:-2], "--block-size", "2"])
    assert result.exit_code == 2 and "another block size" in result.output
    result = runner.invoke(app, ["linearize", "--blockwise", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2 and "--blockwise needs --block-size" in result.output


@pytest.fixture(scope="module")
def linearized_dir(tiny, tmp_path_factory):
    from lolcats import RunConfig, linearize

    out = tmp_path_factory.mktemp("linearized")
    run = RunConfig(model=str(tiny.model), data=(str(tiny.train),), out=str(out),
                    seq_len=256, batch_tokens=1024, stage1_tokens=2000, stage2_tokens=1000, eval_tokens=1024,
                    eval_every=2, held_out=10, dtype="float32", conversion={"window": 32})
    linearize(run, echo=lambda _: None, progress=False)
    return out


def test_generate_streams_the_greedy_continuation(linearized_dir, tiny):
    import lolcats
    from lolcats.cli.generate import generate_text

    prompt = "Once upon a time, there was a little dog"
    result = runner.invoke(app, ["generate", "--model", str(linearized_dir), "--prompt", prompt, "--max-new-tokens", "30"])
    assert result.exit_code == 0, result.output
    expected = generate_text(lolcats.load(linearized_dir), lolcats.load_tokenizer(str(tiny.model)), prompt,
                             max_new_tokens=30)
    assert len(expected) > 20 and result.output.startswith(prompt) and expected.strip() in result.output
    teacher = runner.invoke(app, ["generate", "--model", str(tiny.model), "--prompt", prompt,
                                  "--max-new-tokens", "10", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    assert teacher.exit_code == 0, teacher.output
    assert len(teacher.output) > len(prompt) + 5


def test_bench_decode_writes_json_and_plot(linearized_dir, tmp_path):
    import json

    out, plot = tmp_path / "decode.json", tmp_path / "decode.png"
    result = runner.invoke(app, ["bench", "decode", "--model", str(linearized_dir), "--contexts", "64,300",
                                 "--new-tokens", "3", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["contexts"] == [64, 300]
    for name in ("linearized", "teacher"):
        assert set(data[name]) >= {"ms_per_token", "cache_bytes", "prefill_s", "peak_rss_bytes"}
        assert all(t > 0 for t in data[name]["ms_per_token"] + data[name]["prefill_s"])
    linear_bytes, teacher_bytes = data["linearized"]["cache_bytes"], data["teacher"]["cache_bytes"]
    assert linear_bytes[0] == linear_bytes[1] > 0
    assert teacher_bytes[1] > 4 * teacher_bytes[0]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_decode_refuses_a_base_model(tiny):
    result = runner.invoke(app, ["bench", "decode", "--model", str(tiny.model)])
    assert result.exit_code == 2 and "not a linearized output folder" in result.output
