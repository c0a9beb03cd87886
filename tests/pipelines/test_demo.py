"""`vqtok demo`, the README's first command, end to end at a small scale: real Fashion-MNIST
shards, 2-process DDP training, Ray tokenization, eval, decode, and a 2-process prior with its
held-out evaluation and samples."""
from __future__ import annotations

import json
import os
import re

import tok_data as td


def test_short_demo_writes_what_it_reports_and_its_codes_verify(tmp_path):
    out = tmp_path / "demo"
    proc = td.vqtok(["demo", "--steps", "20", "--limit", "500", "--prior-steps", "5", "--out", str(out)],
                    env={"HOME": str(tmp_path / "home")}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    reported = dict(re.findall(r"^  (tokenizer|training run|codes \(Parquet\)|eval report|decoded samples"
                               r"|prior samples|prior) {2,}(\S+)", proc.stdout, re.M))
    assert len(reported) == 7, proc.stdout
    tokenizer, codes = reported["tokenizer"], reported["codes (Parquet)"]
    for name in ("config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(tokenizer, name))
    assert os.path.isfile(os.path.join(reported["training run"], "metrics.jsonl"))
    for name in ("reconstructions.png", "code_usage.png", "metrics.json"):
        assert os.path.isfile(os.path.join(reported["eval report"], name))
    assert len(list((out / "decoded").rglob("*.png"))) == 64

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["images"] == 500                      # --limit reached every stage
    assert "(500 training rows;" in proc.stdout           # the train split; the test split apart
    for name in ("config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(reported["prior"], name))
    prior_line = re.search(r"^  prior on test +(\{.*\})$", proc.stdout, re.M)
    assert prior_line and json.loads(prior_line.group(1))["bits_per_code"] > 0, proc.stdout

    for output, shards in ((codes, "train-*.tar"), (str(out / "codes_test"), "test-*.tar"),
                           (reported["prior samples"], None)):
        inputs = ["--input", f"{out}/shards/{shards}"] if shards else []
        check = td.vqtok(["verify", output, *inputs])
        assert check.returncode == 0, check.stdout + check.stderr
