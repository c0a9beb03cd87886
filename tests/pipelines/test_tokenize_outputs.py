"""The output directory as a whole (pipelines/tokenize/outputs.py)."""

from __future__ import annotations

import pytest

import tok_data as td
from pipelines.errors import UserError
from pipelines.tokenize.outputs import OutputDir
from pipelines.tokenize.tokenizer_info import tokenizer_metadata


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)


def test_output_dir_refuses_another_tokenizer(tmp_path, tok_dir):
    other = tmp_path / "other"
    td.save_tokenizer(other, seed=1)
    meta_a, meta_b = tokenizer_metadata(tok_dir), tokenizer_metadata(str(other))
    assert meta_a.tokenizer_sha256 != meta_b.tokenizer_sha256
    out = OutputDir(str(tmp_path / "out"))
    out.prepare(meta_a, ["cls"], overwrite=False)
    out.prepare(meta_a, ["cls"], overwrite=False)       # same settings: fine
    with pytest.raises(UserError, match="different tokenizer_sha256"):
        OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=False)
    with pytest.raises(UserError, match="keep_fields"):
        OutputDir(str(tmp_path / "out")).prepare(meta_a, [], overwrite=False)
    (tmp_path / "out" / "x.parquet").write_bytes(b"old")
    OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=True)
    assert not (tmp_path / "out" / "x.parquet").exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="without a vqtok run record"):
        OutputDir(str(stranger)).prepare(meta_a, [], overwrite=False)


def test_a_damaged_index_is_ignored_and_the_manifests_read(tmp_path):
    import gzip
    import json

    sha = "ab" * 32
    (tmp_path / "_manifest").mkdir()
    manifest = {"tokenizer_sha256": sha, "counts": {"ok": 1}, "durations_s": {"wall": 0.1}}
    (tmp_path / "_manifest" / "a.json").write_text(json.dumps(manifest))
    (tmp_path / "a.parquet").write_bytes(b"data")
    index = bytearray(gzip.compress(json.dumps({"version": 1, "tokenizer_sha256": sha,
                                                "shards": {"a": {"counts": {}}}}).encode() * 50))
    index[12] ^= 0xFF                                      # the deflate stream is corrupt (zlib.error)
    (tmp_path / "_manifest" / "_index.json.gz").write_bytes(bytes(index))
    assert OutputDir(str(tmp_path)).finished(["a"], sha) == {"a": {"counts": {"ok": 1}, "durations_s": {"wall": 0.1}}}
