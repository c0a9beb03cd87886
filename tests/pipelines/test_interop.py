"""The real `vqtok tokenize` output, read unchanged by CodesDataset, decode, inspect, pandas,
polars, duckdb, Hugging Face datasets and Ray Data: each sees exactly the code rows (never the
_errors / _manifest files) with their codes, keys and kept `cls`."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from codes_output import png_bytes, save_tiny_model, write_tar
from pipelines import CodesDataset
from pipelines.cli import main
from pipelines.images import ImagePreprocessor

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # the parquet builder is local; never go online
os.environ.setdefault("HF_HUB_OFFLINE", "1")




@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Two shards (one with an undecodable image and a text-only sample) through `vqtok tokenize`."""
    root = tmp_path_factory.mktemp("interop")
    model = save_tiny_model(root / "tok")
    rng = np.random.default_rng(0)
    images = {f"img-{i:04d}": rng.integers(0, 256, (8 + i, 8), dtype=np.uint8) for i in range(11)}
    members = [[], []]
    for i, (key, arr) in enumerate(images.items()):
        members[i // 6] += [(f"{key}.png", png_bytes(arr)), (f"{key}.cls", str(i % 3).encode())]
    members[0] += [("bad.png", b"not a png"), ("bad.cls", b"1"), ("textonly.txt", b"hello")]
    for i, m in enumerate(members):
        write_tar(root / f"in-{i:06d}.tar", m)
    out = root / "codes"
    result = CliRunner().invoke(main, ["tokenize", "--tokenizer", str(root / "tok"), "--input",
                                       str(root / "in-{000000..000001}.tar"), "--output", str(out),
                                       "--workers", "1", "--keep-fields", "cls", "--no-progress",
                                       "--max-error-rate", "0.5"])
    assert result.exit_code == 0, result.output
    prep = ImagePreprocessor(1, model.config.resolution)
    x = torch.stack([torch.from_numpy(np.array(prep(png_bytes(a), "png"))).float() / 255 for a in images.values()])
    codes = model.encode(x).numpy()
    expected = {key: {"codes": codes[i].reshape(-1).tolist(), "cls": i % 3, "shard": f"in-{i // 6:06d}"}
                for i, key in enumerate(images)}
    return {"root": root, "out": str(out), "model": model, "expected": expected}


def check_rows(keys, codes, cls, expected):
    assert sorted(keys) == sorted(expected)                       # every code row, nothing else
    for key, c, k in zip(keys, codes, cls):
        assert [int(v) for v in c] == expected[key]["codes"] and int(k) == expected[key]["cls"]


def test_codes_dataset_reads_the_real_output(real):
    rows = list(CodesDataset(real["out"]))
    check_rows([r["key"] for r in rows], [r["codes"].flatten().tolist() for r in rows],
               [r["cls"] for r in rows], real["expected"])
    assert all(tuple(r["codes"].shape) == real["model"].grid for r in rows)


def test_inspect_and_decode_the_real_output(real):
    info = json.loads(CliRunner().invoke(main, ["inspect", real["out"], "--json"]).stdout)
    assert info["rows"] == 11 and info["shards_done"] == 2 and info["shards_failed"] == 0
    assert info["complete"] and info["errors"] == 2
    assert info["errors_by_reason"] == {"no_image": 1, "undecodable_image": 1}
    assert info["tokenizer_sha256"] == real["model"].weights_sha256()
    out = real["root"] / "png"
    result = CliRunner().invoke(main, ["decode", "--tokenizer", str(real["root"] / "tok"),
                                       "--codes", real["out"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = [json.loads(line) for line in open(out / "_index.jsonl")]
    assert sorted(e["key"] for e in index) == sorted(real["expected"])
    assert all((out / e["file"]).is_file() and e["shard"] == real["expected"][e["key"]]["shard"] for e in index)


def test_pandas_reads_the_directory(real):
    import pandas as pd
    df = pd.read_parquet(real["out"])
    check_rows(df["key"].tolist(), df["codes"].tolist(), df["cls"].tolist(), real["expected"])
    assert df["codes"].iloc[0].dtype == np.int16


def test_polars_reads_the_data_files(real):
    import polars as pl
    df = pl.read_parquet(os.path.join(real["out"], "*.parquet"))
    assert df.schema["codes"] == pl.List(pl.Int16)
    check_rows(df["key"].to_list(), df["codes"].to_list(), df["cls"].to_list(), real["expected"])


def test_duckdb_queries_the_data_files(real):
    import duckdb
    con = duckdb.connect()
    rows = con.execute(f"SELECT key, codes, cls FROM read_parquet('{real['out']}/*.parquet')").fetchall()
    check_rows(*zip(*rows), real["expected"])
    per_class = dict(con.execute(f"SELECT cls, count(*) FROM '{real['out']}/*.parquet' GROUP BY cls").fetchall())
    assert per_class == {c: sum(e["cls"] == c for e in real["expected"].values()) for c in range(3)}


def test_hugging_face_datasets_loads_the_data_files(real, tmp_path):
    import datasets
    files = os.path.join(real["out"], "*.parquet")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    check_rows(ds["key"], ds["codes"], ds["cls"], real["expected"])
    ds2 = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "fp"))
    assert sorted(ds2["key"]) == sorted(real["expected"])


RAY_DATA_READ = r"""
import json, sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
try:
    rows = ray.data.read_parquet(sys.argv[1]).take_all()
finally:
    ray.shutdown()
print(json.dumps([[r["key"], list(map(int, r["codes"])), r["cls"]] for r in rows]))
"""


def test_ray_data_reads_the_directory(real):
    # in a process of its own: an in-process local Ray leaves process-wide state (its token-auth
    # mode) that later in-process drivers of the suite would inherit
    import subprocess
    import sys
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    out = subprocess.run([sys.executable, "-c", RAY_DATA_READ, real["out"]], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    check_rows([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], real["expected"])


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on loopback, used through s3fs."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield s3fs.S3FileSystem()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_the_output_on_s3_through_codes_dataset_inspect_and_decode(real, s3, tmp_path):
    from torch.utils.data import DataLoader

    s3.mkdir("codes-bucket")
    s3.put(real["out"] + "/", "codes-bucket/codes/", recursive=True)
    url = "s3://codes-bucket/codes"
    keys = []
    for rank in range(2):
        loader = DataLoader(CodesDataset(url, rank=rank, world_size=2, shuffle=True), batch_size=4, num_workers=2)
        keys += [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(real["expected"])
    info = json.loads(CliRunner().invoke(main, ["inspect", url, "--json"]).stdout)
    assert info["rows"] == 11 and info["complete"] and info["errors_by_reason"]["no_image"] == 1
    result = CliRunner().invoke(main, ["decode", "--tokenizer", str(real["root"] / "tok"), "--codes", url,
                                       "--out", "s3://codes-bucket/png", "--limit", "5"])
    assert result.exit_code == 0, result.output
    pngs = [p for p in s3.find("codes-bucket/png") if p.endswith(".png")]
    assert len(pngs) == 5 and s3.exists("codes-bucket/png/_index.jsonl")
