from click.testing import CliRunner

from pipelines.cli import main
from tokenizer import __version__


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(main, ["--help"], prog_name="vqtok")
    assert result.exit_code == 0 and "Usage: vqtok" in result.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(main, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_user_errors_are_one_line_not_tracebacks():
    import click

    from pipelines.cli import LazyGroup
    from pipelines.errors import UserError

    @click.command()
    def fail():
        raise UserError("data/x.tar: no such shard")

    class OneCommand(LazyGroup):
        @staticmethod
        def _load(name):
            return fail if name == "fail" else None

    result = CliRunner().invoke(OneCommand(), ["fail"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: data/x.tar: no such shard"
    assert "Traceback" not in result.output


def test_progress_bars_are_throttled_off_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    result = CliRunner().invoke(main, ["inspect", "--help"])   # CliRunner's stderr is no TTY
    assert result.exit_code == 0
    import os
    assert os.environ.get("TQDM_MININTERVAL") == "30"
    monkeypatch.setenv("TQDM_MININTERVAL", "2")                 # the user's choice is kept
    CliRunner().invoke(main, ["inspect", "--help"])
    assert os.environ["TQDM_MININTERVAL"] == "2"
