"""`vqtok verify` through click: report lines, summary, --json, exit status."""
from __future__ import annotations

import json
import os
import shutil

from click.testing import CliRunner

from pipelines.cli import main


def test_verify_clean_then_damaged(tokenized_output, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(tokenized_output["output"], out)
    inputs = [a for p in tokenized_output["inputs"] for a in ("--input", p)]
    result = CliRunner().invoke(main, ["verify", out, *inputs])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"OK {out}: 4 shards, 4 data files, 62 rows; 4 recorded checksums "
                                          "compared; every input shard accounted for"]

    os.remove(f"{out}/train-000001.parquet")
    result = CliRunner().invoke(main, ["verify", out])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"{out}/train-000001.parquet: missing: its manifest says the shard was committed"
    assert lines[-1].startswith(f"FAILED {out}: 1 finding(s); ")

    result = CliRunner().invoke(main, ["verify", out, "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False and report["findings"][0]["path"] == f"{out}/train-000001.parquet"


def test_verify_not_an_output_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'nope'}: no such tokenize output directory"
