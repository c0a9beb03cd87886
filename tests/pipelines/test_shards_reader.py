"""The damage-aware shard reader (pipelines/shards/reader.py)."""

from __future__ import annotations

import io
import numpy as np
import pytest

import tok_data as td
from pipelines.shards.reader import TarShardReader


def test_reader_broken_shards_keep_readable_head_and_flag_damage(tmp_path):
    expected = td.broken_shards(tmp_path)
    for name, exp in expected.items():
        reader = TarShardReader(str(tmp_path / f"{name}.tar"))
        samples = list(reader)
        complete = {s.key for s in samples if s.complete}
        incomplete = {s.key for s in samples if not s.complete}
        assert complete == exp["ok"], name
        assert incomplete == set(exp["errors"]), name
        assert (reader.error is not None) == exp["shard_error"], (name, reader.error)
    reader = TarShardReader(str(tmp_path / "blockcut.tar"))
    list(reader)
    assert "no end-of-archive marker" in reader.error
    reader = TarShardReader(str(tmp_path / "nontar.tar"))
    list(reader)
    assert reader.error.startswith("not a tar archive")
    reader = TarShardReader(str(tmp_path / "missing.tar"))
    assert list(reader) == [] and reader.error == "shard not found"


def test_storage_errors_propagate_but_damage_is_a_shard_error(tmp_path, monkeypatch):
    import fsspec
    td.write(tmp_path / "a.tar", td.tar_bytes([("k1", {"png": td.png(np.zeros((28, 28), np.uint8))})]))

    class Flaky(io.BytesIO):
        def read(self, *a):
            raise ConnectionResetError("connection reset by peer")

    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda url, mode="rb", **kw: type("F", (), {"open": lambda self: Flaky()})()
                        if url.endswith("flaky.tar") else real_open(url, mode, **kw))
    with pytest.raises(ConnectionResetError):     # retried by the driver, not judged as data
        list(TarShardReader(str(tmp_path / "flaky.tar")))
    reader = TarShardReader(str(tmp_path / "a.tar"))
    assert [s.key for s in reader] == ["k1"] and reader.error is None
