from typer.testing import CliRunner

from lolcats.cli import app

runner = CliRunner()


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert commands == {"convert", "linearize"}
    for name in commands:
        assert name in result.output


def test_convert_reports_on_stories260k(stories260k_path, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("window: 32\nfeature_map: t2r\n")
    result = runner.invoke(app, ["convert", "--model", str(stories260k_path), "--config", str(config), "--seq-len", "200"])
    assert result.exit_code == 0, result.output
    assert "converted layers [0, 1, 2, 3, 4]" in result.output
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


def test_linearize_runs_end_to_end_from_the_command_line(stories260k_path, tmp_path):
    from conftest import SHARED

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("batch_tokens: 1024\neval_tokens: 1024\neval_every: 2\nheld_out: 10\neval_max_tokens: 1024\n")
    result = runner.invoke(app, [
        "linearize", "--model", str(stories260k_path), "--data", str(SHARED / "data" / "stories260k_samples.txt"),
        "--eval-text", str(SHARED / "data" / "tinystories_valid.txt"), "--out", str(out), "--config", str(config),
        "--seq-len", "128", "--stage1-tokens", "3000", "--stage2-tokens", "1000", "--lora-rank", "4", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "perplexity on tinystories_valid.txt: teacher" in result.output
    import json

    manifest = json.loads((out / "lolcats.json").read_text())
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "dropout": 0.0}
    assert manifest["run"]["seq_len"] == 128 and manifest["stages"]["stage1"]["tokens"] >= 3000


def test_linearize_errors_are_one_line_without_traceback(stories260k_path, tmp_path):
    result = runner.invoke(app, ["linearize", "--model", str(stories260k_path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data is required" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": 1}\n')
    result = runner.invoke(app, ["linearize", "--model", str(stories260k_path), "--data", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output
    result = runner.invoke(app, ["linearize", "--config", "no-such-recipe", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "packaged recipe" in result.output
