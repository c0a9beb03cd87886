"""K = 16,384 codes end to end: the exact nearest search, a shard tokenized to Parquet (int16
codes), CodesDataset, `vqtok decode` and `vqtok eval`, with codes used across the whole range."""
from __future__ import annotations

import json
import math

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
from tokenizer import VQVAE, QuantizerConfig, VQVAEConfig
from tokenizer.nearest import nearest_codes

K = 16384
# one shard tokenized without a driver: the output has no _SUCCESS, which readers warn about
pytestmark = pytest.mark.filterwarnings("ignore:.*no _SUCCESS")


# the paper's codes in the latent space, and the shipped large-codebook configs' low-dimensional
# l2-normalised codes (searched by angle after a projection)
QUANTIZERS = {"plain": {}, "cosine": {"codebook_dim": 4, "l2_normalize": True}}


@pytest.fixture(scope="module", params=sorted(QUANTIZERS))
def large(request, tmp_path_factory):
    """A tiny 28x28 grey tokenizer with K = 16384 codes: the latents of 300 Fashion-MNIST images
    (14,700 rows, in the search space) and random rows, shuffled over the index range; and a
    shard of 40 other images. -> {'tok', 'model', 'shard', 'images'}."""
    root = tmp_path_factory.mktemp("k16384")
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=1, code_dim=8,
                         quantizer=QuantizerConfig(codebook_size=K, kmeans_init=False,
                                                   **QUANTIZERS[request.param]))
    model = VQVAE(config).eval()
    images, labels = td.fashion_mnist(340, "train")
    with torch.no_grad():
        z = model.encode_latents(torch.from_numpy(images[:300, None]).float() / 255)   # (300, 7, 7, 8)
        rows = model.quantizer.search_vectors(z)                            # (14700, d)
    noise = torch.randn(K - len(rows), rows.shape[1]) * rows.std()
    if config.quantizer.l2_normalize:
        noise = torch.nn.functional.normalize(noise, dim=-1)
    book = torch.cat([rows, noise])[torch.randperm(K)]
    model.quantizer._set_codebook(book)
    model.quantizer.ema_sum.copy_(book)
    model.save_pretrained(str(root / "tok"))
    td.write(root / "in.tar", td.tar_bytes(td.fmnist_samples(images[300:], labels[300:], "img-")))
    return {"tok": str(root / "tok"), "model": VQVAE.from_pretrained(str(root / "tok")),
            "shard": str(root / "in.tar"), "images": images[300:], "root": root}


def test_nearest_search_is_exact_at_16384_codes():
    torch.manual_seed(1)
    book = torch.randn(K, 32)
    x = torch.randn(3000, 32)
    want = torch.cdist(x.double(), book.double()).argmin(1)
    assert torch.equal(nearest_codes(x, book), want)


@pytest.fixture(scope="module")
def tokenized(large):
    out = str(large["root"] / "out")
    meta = tokenizer_metadata(large["tok"])
    job = ShardTokenizer(CodeEncoder(large["tok"], threads=1), meta, out, ["cls"], batch_size=16,
                         decode_processes=0)
    try:
        manifest = job.run(large["shard"], "in")
    finally:
        job.close()
    assert manifest["counts"]["ok"] == 40
    return out


def test_tokenize_codes_dataset_and_decode_at_16384_codes(large, tokenized, tmp_path):
    model = large["model"]
    table = pq.read_table(f"{tokenized}/in.parquet")
    assert str(table.schema.field("codes").type) == "list<element: int16>"
    x = torch.from_numpy(np.stack([ImagePreprocessor(1, 28)(td.png(img)) for img in large["images"]])).float() / 255
    want = model.encode(x)                                                 # (40, 7, 7)
    assert int(want.max()) > K // 2 and len(torch.unique(want)) > 200     # the whole index range in use
    ds = CodesDataset(tokenized)
    assert ds.codebook_size == K and ds.grid == (7, 7)
    got = {r["key"]: r["codes"] for r in ds}
    for i in range(40):
        assert torch.equal(got[f"img-{i:06d}"], want[i]), i
    r = CliRunner().invoke(main, ["decode", "--tokenizer", large["tok"], "--codes", tokenized,
                                                  "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    back = np.asarray(Image.open(tmp_path / "png" / "in" / "img-000007.png"))
    expect = (model.decode(want[7:8])[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(back, expect)


def test_eval_counts_all_16384_codes(large, tmp_path):
    model = large["model"]
    r = CliRunner().invoke(main, ["eval", "--tokenizer", large["tok"], "--input", large["shard"],
                                                  "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    x = torch.from_numpy(large["images"][:, None]).float() / 255
    counts = torch.bincount(model.encode(x).flatten(), minlength=K).double()
    p = counts[counts > 0] / counts.sum()
    assert got["images"] == 40
    assert got["usage"] == pytest.approx(float((counts > 0).double().mean()), abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), abs=1e-2)
    assert len(json.load(open(tmp_path / "report" / "metrics.json"))["counts"]) == K
