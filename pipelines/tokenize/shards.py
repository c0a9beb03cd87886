"""Stream the samples of one WebDataset shard, telling a clean end from a damaged one.

Python's tarfile stops silently at a truncated header, at garbage and at a file cut exactly at a
512-byte block boundary (no end-of-archive marker). `TarMembers` (tarstream.py) records why the
member stream ended, so a shard that does not end with the zero-block marker becomes a shard
error after its readable head was yielded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from .tarstream import END_MARKER, TarMembers


@dataclass
class Sample:
    key: str                                   # WebDataset __key__: member path up to the first dot
    fields: dict[str, bytes] = field(default_factory=dict)   # extension (lower case) -> bytes
    complete: bool = True                      # False when the tar broke inside this sample
    duplicate: bool = False                    # the key was already seen in this shard


def split_member_name(name: str) -> tuple[str, str] | None:
    """'a/b/x1.seg.png' -> ('a/b/x1', 'seg.png'); None for names without an extension."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return name[: len(name) - len(base)] + stem, ext.lower()


class TarShardReader:
    """Iterate `Sample`s of one shard in stored order. After iteration, `error` is None for a
    clean shard or a readable reason (not a tar, truncated, unreadable), and `bytes_read` says
    how far it got. Samples whose members were split by the damage come out with complete=False."""

    def __init__(self, url: str):
        self.url = url
        self.error: str | None = None
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Sample]:
        try:
            f = fsspec.open(self.url, "rb").open()
        except FileNotFoundError:
            self.error = "shard not found"
            return
        except ValueError as e:
            self.error = f"shard cannot be opened ({e})"
            return
        try:
            yield from self._samples(f)
        finally:
            f.close()

    def _samples(self, f) -> Iterator[Sample]:
        members = TarMembers(f)
        sample: Sample | None = None
        for name, data in members:
            self.bytes_read = members.offset
            parts = split_member_name(name)
            if parts is None:
                continue
            key, ext = parts
            if sample is not None and sample.key != key:
                yield sample
                sample = None
            if sample is None:
                sample = Sample(key)
            if data is not None:
                sample.fields[ext] = data
        self.bytes_read = members.offset
        if members.end != END_MARKER:
            if members.offset == 0:
                self.error = f"not a tar archive ({members.end})"
            else:
                self.error = f"truncated tar: {members.end} after {members.offset} bytes"
        if sample is not None:
            sample.complete = self.error is None
            yield sample
