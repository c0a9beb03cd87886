"""`vqtok demo`, the README's first command, end to end at a small scale: real Fashion-MNIST
shards, 2-process DDP training, Ray tokenization, eval, decode."""
from __future__ import annotations

import json
import os
import re

import tok_data as td


def test_short_demo_writes_what_it_reports_and_its_codes_verify(tmp_path):
    out = tmp_path / "demo"
    proc = td.vqtok(["demo", "--steps", "20", "--limit", "500", "--out", str(out)],
                    env={"HOME": str(tmp_path / "home")}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    reported = dict(re.findall(r"^  (tokenizer|training run|codes \(Parquet\)|eval report|decoded samples)"
                               r" +(\S+)", proc.stdout, re.M))
    assert len(reported) == 5, proc.stdout
    tokenizer, codes = reported["tokenizer"], reported["codes (Parquet)"]
    for name in ("config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(tokenizer, name))
    assert os.path.isfile(os.path.join(reported["training run"], "metrics.jsonl"))
    for name in ("reconstructions.png", "code_usage.png", "metrics.json"):
        assert os.path.isfile(os.path.join(reported["eval report"], name))
    assert len(list((out / "decoded").rglob("*.png"))) == 64

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["images"] == 500                      # --limit reached every stage
    assert "1000 rows" in proc.stdout                    # 500 train + 500 test images tokenized

    check = td.vqtok(["verify", codes, "--input", f"{out}/shards/*.tar"])
    assert check.returncode == 0, check.stdout + check.stderr
