"""FSQ and SimVQ tokenizers through the whole output contract: a shard tokenized to Parquet,
CodesDataset, `vqtok decode` and `vqtok eval` give what `VQVAE.encode` / `decode` give; and
`vqtok train` trains an FSQ tokenizer."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tok_data as td
from pipelines.cli import main
from pipelines.images import ImagePreprocessor
from pipelines.readers import CodesDataset
from pipelines.tokenize.encoder import CodeEncoder
from pipelines.tokenize.shard_job import ShardTokenizer
from pipelines.tokenize.tokenizer_info import tokenizer_metadata
from tokenizer import VQVAE, VQVAEConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*no _SUCCESS")   # one shard, no driver

# 1000 codes each: FSQ's implicit grid, and SimVQ's mapped frozen basis (k-means seeded)
KINDS = {"fsq": {"kind": "fsq", "levels": [10, 10, 10]},
         "simvq": {"codebook_size": 1000, "ema": False, "simvq": True}}


@pytest.fixture(scope="module", params=sorted(KINDS))
def tok(request, tmp_path_factory):
    """A tiny grey tokenizer of the kind, trained 30 steps on 300 Fashion-MNIST images (so that
    its codes vary), saved; and a shard of 40 other images."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=1, code_dim=8,
                         quantizer=KINDS[request.param])
    model = VQVAE(config)
    images, labels = td.fashion_mnist(340, "train")
    x = torch.from_numpy(images[:300, None]).float() / 255
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(30):
        _, _, losses = model.train()(x[torch.randint(0, 300, (64,))])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval().save_pretrained(str(root / "tok"))
    td.write(root / "in.tar", td.tar_bytes(td.fmnist_samples(images[300:], labels[300:], "img-")))
    return {"kind": request.param, "tok": str(root / "tok"), "model": VQVAE.from_pretrained(str(root / "tok")),
            "shard": str(root / "in.tar"), "images": images[300:], "root": root}


def test_tokenize_codes_dataset_decode_and_eval_agree_with_the_model(tok, tmp_path):
    model = tok["model"]
    assert model.codebook_size == 1000
    out = str(tmp_path / "out")
    job = ShardTokenizer(CodeEncoder(tok["tok"], threads=1), tokenizer_metadata(tok["tok"]), out, ["cls"],
                         batch_size=16, decode_processes=0)
    try:
        assert job.run(tok["shard"], "in")["counts"]["ok"] == 40
    finally:
        job.close()
    assert str(pq.read_table(f"{out}/in.parquet").schema.field("codes").type) == "list<element: int16>"
    x = torch.from_numpy(np.stack([ImagePreprocessor(1, 28)(td.png(img)) for img in tok["images"]])).float() / 255
    want = model.encode(x)                                                  # (40, 7, 7)
    assert len(torch.unique(want)) > 20 and int(want.max()) < 1000
    ds = CodesDataset(out)
    assert ds.codebook_size == 1000 and ds.grid == (7, 7)
    got = {r["key"]: r["codes"] for r in ds}
    for i in range(40):
        assert torch.equal(got[f"img-{i:06d}"], want[i]), i
    r = CliRunner().invoke(main, ["decode", "--tokenizer", tok["tok"], "--codes", out, "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    back = np.asarray(Image.open(tmp_path / "png" / "in" / "img-000007.png"))
    expect = (model.decode(want[7:8])[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(back, expect)
    r = CliRunner().invoke(main, ["eval", "--tokenizer", tok["tok"], "--input", tok["shard"],
                                  "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    counts = torch.bincount(want.flatten(), minlength=1000).double()
    p = counts[counts > 0] / counts.sum()
    assert report["usage"] == pytest.approx(float((counts > 0).double().mean()), abs=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), abs=1e-2)


def test_vqtok_train_trains_an_fsq_tokenizer(tmp_path):
    (tmp_path / "d").mkdir()
    td.write_fmnist_shards(tmp_path / "d", 2, 32)
    train = str(tmp_path / "d" / "train-*.tar")
    sets = ["model.hidden=16", "model.res_hidden=8", "model.code_dim=8", "model.num_res_blocks=1",
            "model.quantizer.kind=fsq", "model.quantizer.levels=[4,4,2]", "data.num_workers=0",
            "data.shuffle_buffer=16", "train.progress=false", "train.log_every=2"]
    r = CliRunner().invoke(main, ["train", "--train-data", train, "--out", str(tmp_path / "run"), "--max-steps", "4",
                                  "--batch-size", "8", *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    model = VQVAE.from_pretrained(str(tmp_path / "run" / "final"))
    assert model.config.quantizer.kind == "fsq" and model.codebook_size == 32
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in records if x["split"] == "train"] == [2, 4]
    assert "commitment" not in records[-1] and 0 < records[-1]["usage"] <= 1
    assert os.path.exists(tmp_path / "run" / "config.yaml")
