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
    counts = {"read": 1, "ok": 1, "failed": 0, "shard_errors": 0, "failed_by_reason": {}}
    manifest = {"tokenizer_sha256": sha, "counts": counts, "durations_s": {"wall": 0.1}}
    (tmp_path / "_manifest" / "a.json").write_text(json.dumps(manifest))
    (tmp_path / "a.parquet").write_bytes(b"data")
    index = bytearray(gzip.compress(json.dumps({"version": 1, "tokenizer_sha256": sha,
                                                "shards": {"a": {"counts": {}}}}).encode() * 50))
    index[12] ^= 0xFF                                      # the deflate stream is corrupt (zlib.error)
    (tmp_path / "_manifest" / "_index.json.gz").write_bytes(bytes(index))
    assert OutputDir(str(tmp_path)).finished(["a"], sha) == {"a": {"counts": counts, "durations_s": {"wall": 0.1}}}


def test_a_manifest_or_index_entry_the_summary_cannot_add_up_leaves_its_shard_to_redo(tmp_path):
    import gzip
    import json

    sha = "cd" * 32
    (tmp_path / "_manifest").mkdir()
    good = {"read": 2, "ok": 2, "failed": 0, "shard_errors": 0, "failed_by_reason": {}}
    manifests = {"a": {"tokenizer_sha256": sha, "counts": good, "durations_s": {"wall": 1.0}},
                 "b": {"tokenizer_sha256": sha, "counts": "x", "durations_s": {}},
                 "c": {"tokenizer_sha256": sha, "counts": {**good, "read": "2"}, "durations_s": {}},
                 "d": [1, 2]}
    for shard, manifest in manifests.items():
        (tmp_path / "_manifest" / f"{shard}.json").write_text(json.dumps(manifest))
        (tmp_path / f"{shard}.parquet").write_bytes(b"data")
    assert set(OutputDir(str(tmp_path)).finished(list(manifests), sha)) == {"a"}
    # an index entry it cannot add up is not used: the manifest file is read instead
    index = {"version": 1, "tokenizer_sha256": sha, "shards": {"a": {"counts": None}, "c": {"counts": good}}}
    (tmp_path / "_manifest" / "_index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    assert OutputDir(str(tmp_path)).finished(list(manifests), sha) == \
        {"a": {"counts": good, "durations_s": {"wall": 1.0}}}


def test_an_output_that_is_a_file_or_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--output .*/file: is a file, not a directory$"):
        OutputDir(str(tmp_path / "file")).check_location()
    with pytest.raises(UserError, match=r"^--output .*/file/out: cannot be created, a parent of it is a file$"):
        OutputDir(str(tmp_path / "file" / "out")).check_location()
    OutputDir(str(tmp_path / "new" / "out")).check_location()
    assert (tmp_path / "new" / "out").is_dir()
