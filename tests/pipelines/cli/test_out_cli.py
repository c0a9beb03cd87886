"""Every command that writes into a directory says in one line why it cannot, before any work:
`vqtok prepare` and `vqtok train` here (tokenize, decode and eval have their own tests)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import tok_data as td
from pipelines.cli import main

CASES = [("file", "is a file, not a directory"),
         ("file/sub", "cannot be created, a parent of it is a file"),
         ("/proc/vqtok-no-such-dir", "cannot be created (No such file or directory)")]


def commands(tmp_path) -> dict[str, list[str]]:
    images, labels = td.fashion_mnist(4)
    shard = td.write(tmp_path / "a.tar", td.tar_bytes(td.fmnist_samples(images, labels, "a-")))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.png").write_bytes(td.png(images[0]))
    return {"prepare fashion-mnist": ["prepare", "fashion-mnist", "--limit", "2"],
            "prepare folder": ["prepare", "folder", str(tmp_path / "photos")],
            "train": ["train", "--config", "configs/fashion_mnist.yaml", "--train-data", shard,
                      "--max-steps", "1"]}


@pytest.mark.parametrize("where,why", CASES)
@pytest.mark.parametrize("command", ["prepare fashion-mnist", "prepare folder", "train"])
def test_an_unusable_out_is_a_one_line_error(tmp_path, command, where, why):
    (tmp_path / "file").write_text("not a directory")
    out = where if where.startswith("/") else str(tmp_path / where)
    result = CliRunner().invoke(main, [*commands(tmp_path)[command], "--out", out])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines() == [f"Error: --out {out}: {why}"]
    assert (tmp_path / "file").read_text() == "not a directory"
