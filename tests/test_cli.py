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
