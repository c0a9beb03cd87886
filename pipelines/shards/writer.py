"""Atomic WebDataset shard writer: a shard appears under its final name complete or not at all.

The tar itself is written by the webdataset library's TarWriter (the member layout its own
readers, and ours, expect), into tokenizer.storage.AtomicFile: fsynced and renamed into place, or
uploaded in one PUT."""
from __future__ import annotations

import contextlib

import fsspec
import webdataset as wds

from tokenizer.storage import AtomicFile


class ShardWriter:
    """Write samples ({"__key__": str, ext: bytes}) into `pattern % index` tars of at most
    `shard_size` samples. Each tar is built in a local temporary file and then published by
    AtomicFile: fsync + rename (local) or one upload (object stores, atomic per object)."""

    def __init__(self, out: str, pattern: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.fs, self.root = fsspec.core.url_to_fs(out)
        self.out = out
        self.pattern = pattern
        self.shard_size = shard_size
        self.fs.makedirs(self.root, exist_ok=True)
        self.index = 0
        self.count = 0
        self.written: list[str] = []
        self._file: AtomicFile | None = None
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
        final = f"{self.out.rstrip('/')}/{self.pattern % self.index}"
        self._file = AtomicFile(final)     # local: a hidden temp file beside the target
        self._tar = wds.TarWriter(self._file.file, encoder=False, mtime=0.0, mode=0o644, user="",
                                   group="", format="PAX_FORMAT")   # long keys, as tarfile's default
        self.count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()          # writes the end-of-archive marker; leaves the file open
        self._tar = None
        self._file.publish()       # fsync, rename (local) or one upload (object stores)
        self.written.append(self._file.path)
        self.index += 1
        self._file = None

    def close(self) -> list[str]:
        self._close()
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress (never published)."""
        if self._tar is not None:
            with contextlib.suppress(Exception):   # its end marker: the file is dropped anyway
                self._tar.close()
            self._file.discard()
            self._tar = None
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
