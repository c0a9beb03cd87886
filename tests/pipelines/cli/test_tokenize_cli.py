"""`vqtok tokenize` through click: an --output that cannot be used is a one-line error before Ray
starts; the options reach TokenizeConfig."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import tok_data as td
from pipelines.cli import main
from pipelines.tokenize import driver


@pytest.fixture
def tokenize(tmp_path, tok_dir, monkeypatch):
    """args -> the CliRunner result of `vqtok tokenize` on one small shard, with Ray forbidden."""
    images, labels = td.fashion_mnist(2)
    shard = td.write(tmp_path / "a.tar", td.tar_bytes(td.fmnist_samples(images, labels, "a-")))

    def no_ray(address):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "ray_session", no_ray)
    return lambda *args: CliRunner().invoke(main, ["tokenize", "--tokenizer", tok_dir, "--input", shard,
                                                   "--no-progress", *args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


def test_an_output_that_is_a_file_is_named_as_such(tmp_path, tokenize):
    (tmp_path / "file").write_text("not a directory")
    msg = one_line_error(tokenize("--output", str(tmp_path / "file")))
    assert msg == f"--output {tmp_path / 'file'}: is a file, not a directory"


@pytest.mark.parametrize("where,why", [("under-a-file", "cannot be created, a parent of it is a file"),
                                       ("proc", "cannot be created (No such file or directory)")])
def test_an_output_that_cannot_be_written_is_a_one_line_error(tmp_path, tokenize, where, why):
    (tmp_path / "file").write_text("not a directory")
    output = str(tmp_path / "file" / "out") if where == "under-a-file" else "/proc/vqtok-out"
    msg = one_line_error(tokenize("--output", output))
    assert msg == f"--output {output}: {why}"


def test_shard_timeout_reaches_the_config_and_is_validated():
    from unittest import mock

    with mock.patch("pipelines.tokenize.run_tokenize", side_effect=SystemExit(0)) as run:
        CliRunner().invoke(main, ["tokenize", "--tokenizer", "t", "--input", "a.tar", "--output", "o",
                                  "--shard-timeout", "90"])
    assert run.call_args[0][0].shard_timeout == 90.0
    result = CliRunner().invoke(main, ["tokenize", "--tokenizer", "t", "--input", "a.tar", "--output", "o",
                                       "--shard-timeout", "0"])
    assert result.exit_code == 1 and "Error: tokenize.shard_timeout = 0.0 must be > 0 seconds" in result.output
    with mock.patch("pipelines.tokenize.run_tokenize", side_effect=SystemExit(0)) as run:
        CliRunner().invoke(main, ["tokenize", "--tokenizer", "t", "--input", "a.tar", "--output", "o"])
    assert run.call_args[0][0].shard_timeout == 1800.0
