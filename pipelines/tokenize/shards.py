"""Stream the samples of one WebDataset shard, telling a clean end from a damaged one.

Python's tarfile stops silently at a truncated header, at garbage and at a file cut exactly at a
512-byte block boundary (no end-of-archive marker). `EndAwareTarInfo` records why the member
stream ended, so a shard that does not end with the zero-block marker becomes a shard error
after its readable head was yielded.
"""
from __future__ import annotations

import gzip
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

# damage in the bytes themselves: a shard error. Any other OSError (network, permissions) is a
# storage failure and propagates, so that the attempt is retried rather than the data judged.
DAMAGE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


@dataclass
class Sample:
    key: str                                   # WebDataset __key__: member path up to the first dot
    fields: dict[str, bytes] = field(default_factory=dict)   # extension (lower case) -> bytes
    complete: bool = True                      # False when the tar broke inside this sample
    duplicate: bool = False                    # the key was already seen in this shard


class EndAwareTarInfo(tarfile.TarInfo):
    """TarInfo whose header parser notes on the TarFile why the member stream ended."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.vqtok_end = "marker"           # a zero block: the proper end-of-archive
            raise
        except tarfile.EmptyHeaderError:
            tar.vqtok_end = "no end-of-archive marker (file ends at a block boundary)"
            raise
        except tarfile.TruncatedHeaderError:
            tar.vqtok_end = "truncated member header"
            raise
        except tarfile.InvalidHeaderError as e:
            tar.vqtok_end = f"invalid member header ({e})"
            raise


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
        try:
            tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=EndAwareTarInfo)
        except DAMAGE_ERRORS as e:
            self.error = f"not a tar archive ({e})"
            return
        sample: Sample | None = None
        try:
            with tar:
                for member in tar:
                    self.bytes_read = tar.offset
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key, ext = parts
                    if sample is not None and sample.key != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = Sample(key)
                    sample.fields[ext] = tar.extractfile(member).read()
                self.bytes_read = tar.offset
                end = getattr(tar, "vqtok_end", None)
                if end != "marker":
                    self.error = f"truncated tar: {end or 'stream ended early'} after {tar.offset} bytes"
        except DAMAGE_ERRORS as e:
            self.error = f"truncated or corrupt tar after {self.bytes_read} bytes ({e})"
        if sample is not None:
            sample.complete = self.error is None
            yield sample
