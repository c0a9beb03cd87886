"""Atomic WebDataset shard writer: a shard appears under its final name complete or not at all.

The tar itself is written by the webdataset library's TarWriter (the member layout its own
readers, and ours, expect), into a local temporary file that is then published atomically."""
from __future__ import annotations

import os
import tempfile

import fsspec
import webdataset as wds

from tokenizer.storage import is_local_fs


class ShardWriter:
    """Write samples ({"__key__": str, ext: bytes}) into `pattern % index` tars of at most
    `shard_size` samples. Each tar is built in a local temporary file and then renamed into place
    (local) or uploaded with one PUT (object stores, atomic per object)."""

    def __init__(self, out: str, pattern: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.out = out
        self.pattern = pattern
        self.shard_size = shard_size
        self.local = is_local_fs(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)
        self.index = 0
        self.count = 0
        self.written: list[str] = []
        self._tmp = None
        self._file = None
        self._tar: wds.TarWriter | None = None

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        # bytes as given (no encoding), reproducible headers
        self._tar.write({"__key__": sample["__key__"],
                         **{ext: data for ext, data in sample.items() if not ext.startswith("__")}})
        self.count += 1
        if self.count >= self.shard_size:
            self._close()

    def _open(self) -> None:
        # local: temp file next to the target so the rename stays on one filesystem
        tmp_dir = self.root if self.local else None
        fd, path = tempfile.mkstemp(prefix=".tmp-shard-", suffix=".tar", dir=tmp_dir)
        os.close(fd)
        self._tmp = path
        self._file = open(path, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, mode=0o644, user="", group="",
                                   format="PAX_FORMAT")   # long keys, as tarfile's default
        self.count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._finish_file()
        final = f"{self.root.rstrip('/')}/{self.pattern % self.index}"
        try:
            if self.local:
                os.replace(self._tmp, final)
            else:
                self.fs.put_file(self._tmp, final)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        self.written.append(final)
        self.index += 1
        self._tar = None
        self._tmp = None

    def _finish_file(self) -> None:
        self._tar.close()               # writes the end-of-archive marker; leaves the file open
        self._file.flush()
        os.fsync(self._file.fileno())   # on disk before it is renamed into place
        self._file.close()

    def close(self) -> list[str]:
        self._close()
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress (never renamed into place)."""
        if self._tar is not None:
            self._finish_file()
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
