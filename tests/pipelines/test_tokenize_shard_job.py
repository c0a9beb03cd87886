"""One shard end to end (pipelines/tokenize/shard_job.py)."""

from __future__ import annotations

import json
import os
import pyarrow.parquet as pq
import pytest

import tok_data as td
from pipelines.output_format import read_metadata
from pipelines.tokenize.encoder import CodeEncoder
from pipelines.images import ImagePreprocessor
from pipelines.tokenize.shard_job import ShardTokenizer
from pipelines.tokenize.tokenizer_info import tokenizer_metadata


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)


@pytest.mark.parametrize("decode_processes", [0, 2])   # inline (one-CPU CPU worker) and processes
def test_one_shard_end_to_end_rows_errors_manifest(tmp_path, tok_dir, decode_processes):
    samples, expected_ok, reasons = td.odd_samples()
    td.write(tmp_path / "odd.tar", td.tar_bytes(samples))
    meta = tokenizer_metadata(tok_dir)
    enc = CodeEncoder(tok_dir, threads=1)
    job = ShardTokenizer(enc, meta, str(tmp_path / "out"), ["cls"], batch_size=4,
                         decode_processes=decode_processes)
    try:
        manifest = job.run(str(tmp_path / "odd.tar"), "odd")
    finally:
        job.close()
    table = pq.read_table(tmp_path / "out" / "odd.parquet")
    assert sorted(table.column("key").to_pylist()) == sorted(expected_ok)
    assert set(table.column("shard").to_pylist()) == {"odd"}
    assert str(table.schema.field("codes").type) == "list<element: int16>"
    assert all(len(c) == 49 for c in table.column("codes").to_pylist())
    assert read_metadata(str(tmp_path / "out" / "odd.parquet")).tokenizer_sha256 == enc.sha256
    cls = dict(zip(table.column("key").to_pylist(), table.column("cls").to_pylist()))
    assert cls["cmyk"] == 2 and cls["webp"] == 9
    errors = pq.read_table(tmp_path / "out" / "_errors" / "odd.parquet").to_pylist()
    by_key = {e["key"]: e["error"] for e in errors}
    assert set(by_key) == set(reasons) | {"good-000000"}           # the duplicate key
    assert "duplicate key" in by_key["good-000000"] and "no image" in by_key["textonly"]
    counts = manifest["counts"]
    assert counts["read"] == len(samples) and counts["ok"] == len(expected_ok)
    assert counts["failed"] == len(reasons) + 1 and counts["shard_errors"] == 0
    expect_reasons = {}
    for r in list(reasons.values()) + ["duplicate_key"]:
        expect_reasons[r] = expect_reasons.get(r, 0) + 1
    assert counts["failed_by_reason"] == expect_reasons
    on_disk = json.loads((tmp_path / "out" / "_manifest" / "odd.json").read_text())
    assert on_disk["counts"] == counts and set(on_disk["durations_s"]) >= {"read", "decode", "encode", "write"}
    # codes equal a direct encode of the same decoded image
    good = [f for k, f in samples if k == "good-000001"][0]
    direct = enc.encode(ImagePreprocessor(1, 28)(good["png"])[None])[0]
    row = table.column("key").to_pylist().index("good-000001")
    assert table.column("codes")[row].as_py() == direct.tolist()
    assert not os.listdir(tmp_path / "out" / "_tmp")                # nothing left behind


def test_a_member_over_max_member_bytes_is_an_error_row_not_read(tmp_path, tok_dir):
    images, labels = td.fashion_mnist(3)
    samples = td.fmnist_samples(images, labels, "k-")
    samples[1][1]["png"] = td.png(images[1]) + bytes(4096)          # 4 KiB over a 2 KiB limit
    td.write(tmp_path / "big.tar", td.tar_bytes(samples))
    job = ShardTokenizer(CodeEncoder(tok_dir, threads=1), tokenizer_metadata(tok_dir), str(tmp_path / "out"),
                         ["cls"], batch_size=4, decode_processes=0, max_member_bytes=2048)
    try:
        manifest = job.run(str(tmp_path / "big.tar"), "big")
    finally:
        job.close()
    assert manifest["counts"]["ok"] == 2 and manifest["counts"]["failed_by_reason"] == {"member_too_large": 1}
    (error,) = pq.read_table(tmp_path / "out" / "_errors" / "big.parquet").to_pylist()
    assert error["key"] == "k-000001" and "limit 2,048 bytes" in error["error"]


def test_max_member_mib_reaches_the_config():
    from click.testing import CliRunner
    from unittest import mock
    from pipelines.cli import main
    with mock.patch("pipelines.tokenize.run_tokenize", side_effect=SystemExit(0)) as run:
        CliRunner().invoke(main, ["tokenize", "--tokenizer", "t", "--input", "a.tar", "--output", "o",
                                  "--max-member-mib", "3"])
    assert run.call_args[0][0].max_member_bytes == 3 << 20


@pytest.mark.parametrize("decode_processes", [0, 2])
def test_crafted_members_cost_their_row_never_the_shard(tmp_path, tok_dir, decode_processes):
    """A non-UTF-8 name, a repeated member, links, a FIFO, hidden and extension-less members: each
    is one named error row; the good samples are written and the shard commits."""
    data, expected_ok, reasons = td.hostile_shard()
    td.write(tmp_path / "hostile.tar", data)
    job = ShardTokenizer(CodeEncoder(tok_dir, threads=1), tokenizer_metadata(tok_dir), str(tmp_path / "out"),
                         ["cls"], batch_size=4, decode_processes=decode_processes)
    try:
        manifest = job.run(str(tmp_path / "hostile.tar"), "hostile")
    finally:
        job.close()
    table = pq.read_table(tmp_path / "out" / "hostile.parquet")
    assert table.column("key").to_pylist() == expected_ok
    errors = pq.read_table(tmp_path / "out" / "_errors" / "hostile.parquet").to_pylist()
    by_key = {e["key"]: e["error"] for e in errors}
    assert set(by_key) == set(reasons)
    assert "is a symbolic link" in by_key["symlink"] and "is a FIFO" in by_key["fifo"]
    assert "stored twice" in by_key["twice"] and "not valid UTF-8" in by_key["caf\\xe9"]
    counts = manifest["counts"]
    assert counts["ok"] == len(expected_ok) and counts["failed"] == len(reasons)
    assert counts["read"] == counts["ok"] + counts["failed"] and counts["shard_errors"] == 0
    expect = {}
    for reason in reasons.values():
        expect[reason] = expect.get(reason, 0) + 1
    assert counts["failed_by_reason"] == expect


def test_a_retry_interrupted_after_its_data_write_leaves_no_manifest_of_other_bytes(tmp_path, tok_dir, monkeypatch):
    # a committed shard is retried (e.g. its first call's answer was lost with its worker) and the
    # input changed meanwhile, so the retry writes other bytes; it dies before its manifest
    from pipelines.tokenize import commit
    from pipelines.tokenize.outputs import OutputDir
    from pipelines.verify import verify_output

    images, labels = td.fashion_mnist(6)
    shard_url = td.write(tmp_path / "s.tar", td.tar_bytes(td.fmnist_samples(images, labels, "a-")))
    out = str(tmp_path / "out")
    meta = tokenizer_metadata(tok_dir)
    OutputDir(out).prepare(meta, ["cls"], overwrite=False)
    job = ShardTokenizer(CodeEncoder(tok_dir, threads=1), meta, out, ["cls"], batch_size=4, decode_processes=0)
    try:
        job.run(shard_url, "s")
        td.write(tmp_path / "s.tar", td.tar_bytes(td.fmnist_samples(images[:3], labels[:3], "b-")))
        real_put = commit.put_atomic

        def no_manifest(url, data, output):
            if "/_manifest/" in url:
                raise OSError("storage went away")
            real_put(url, data, output)

        monkeypatch.setattr(commit, "put_atomic", no_manifest)
        with pytest.raises(OSError, match="storage went away"):
            job.run(shard_url, "s", attempt=2)
    finally:
        job.close()
    assert pq.read_table(tmp_path / "out" / "s.parquet").num_rows == 3          # the retry's data
    causes = [f["cause"] for f in verify_output(out)["findings"] if f["path"].endswith("/s.parquet")]
    assert not any("sha256 differs" in c or "were committed" in c for c in causes), causes
    assert len(causes) == 1 and causes[0].startswith("no manifest")
    assert OutputDir(out).finished(["s"], meta.tokenizer_sha256) == {}           # redone by the next run
