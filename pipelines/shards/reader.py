"""Stream the samples of one WebDataset shard, telling a clean end from a damaged one.

Python's tarfile stops silently at a truncated header, at garbage and at a file cut exactly at a
512-byte block boundary (no end-of-archive marker). `TarMembers` (tarstream.py) records why the
member stream ended, so a shard that does not end with the zero-block marker becomes a shard
error after its readable head was yielded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec

from .tarstream import END_MARKER, SKIPPED, SPECIAL, TOO_LARGE, BlockPrefetcher, OpenFailed, TarMembers

MAX_MEMBER_BYTES = 256 << 20    # default: a larger member becomes an error, never held in memory


@dataclass
class Sample:
    """One sample as stored: every member of the shard ends up in exactly one place of exactly
    one Sample (a field, skipped, too_large, special or repeated), or is a stray Sample of its
    own, or lies in the damage that `TarShardReader.error` reports. Whether it is usable is the
    sample policy's decision (pipelines/samples.py), not the reader's."""
    key: str                                   # WebDataset __key__: member path up to the first dot
    fields: dict[str, bytes] = field(default_factory=dict)   # extension (lower case) -> bytes
    complete: bool = True                      # False when the tar broke inside this sample
    duplicate: bool = False                    # the key was already seen in this shard
    skipped: list[str] = field(default_factory=list)        # fields present but not asked for
    too_large: dict[str, int] = field(default_factory=dict)  # field -> size, over the limit
    special: dict[str, str] = field(default_factory=dict)    # field -> kind: link, FIFO, ...
    repeated: list[str] = field(default_factory=list)       # fields stored twice in a row
    stray: str | None = None                   # a member of no sample (key = its name): why

    def present(self) -> list[str]:
        """Every field name the sample has, in whatever form."""
        return sorted({*self.fields, *self.skipped, *self.too_large, *self.special})


def split_member_name(name: str) -> tuple[str, str] | None:
    """'a/b/x1.seg.png' -> ('a/b/x1', 'seg.png'); None for names without an extension."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return name[: len(name) - len(base)] + stem, ext.lower()


def stray_reason(name: str) -> str:
    """Why a member named `name` belongs to no sample (split_member_name gave None)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("."):
        return "hidden member (its name starts with '.'): no sample key"
    return "member name has no extension: not a WebDataset field"


class TarShardReader:
    """Iterate `Sample`s of one shard in stored order. After iteration, `error` is None for a
    clean shard or a readable reason (not a tar, truncated, unreadable), and `bytes_read` says
    how far it got. Samples whose members were split by the damage come out with complete=False.

    want_field(ext) -> bool: fields it refuses are streamed past, never held (their names are
    listed in `Sample.skipped`); a field over max_member_bytes is not read either and is listed
    in `Sample.too_large`. Memory per sample is thus bounded by what the caller asked for."""

    def __init__(self, url: str, want_field: Callable[[str], bool] | None = None,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES,
                 stall_check: Callable[[], None] | None = None):
        self.url = url
        self.want_field = want_field
        self.max_member_bytes = max_member_bytes
        self.stall_check = stall_check          # called while a storage read waits; may raise
        self.error: str | None = None
        self.bytes_read = 0
        self._split: tuple[str | None, tuple[str, str] | None] = (None, None)

    def __iter__(self) -> Iterator[Sample]:
        # storage reads (the open too: a FIFO blocks there) overlap parsing and decoding
        blocks = BlockPrefetcher(lambda: fsspec.open(self.url, "rb").open(), stall_check=self.stall_check)
        try:
            yield from self._samples(blocks)
        except OpenFailed as e:
            if isinstance(e.cause, FileNotFoundError):
                self.error = "shard not found"
            elif isinstance(e.cause, ValueError):
                self.error = f"shard cannot be opened ({e.cause})"
            else:
                raise e.cause from None         # a storage error: the attempt is retried
        finally:
            blocks.close()

    def _wants(self, member: str) -> bool:
        parts = split_member_name(member)
        self._split = (member, parts)           # the same member's name comes back next
        return parts is not None and self.want_field(parts[1])

    def _split_name(self, member: str) -> tuple[str, str] | None:
        last, parts = self._split
        return parts if last == member else split_member_name(member)

    def _samples(self, f) -> Iterator[Sample]:
        want = self._wants if self.want_field is not None else None
        members = TarMembers(f, want, self.max_member_bytes)
        sample: Sample | None = None
        seen: set[str] = set()                  # keys of this shard so far
        for name, data in members:
            self.bytes_read = members.offset
            parts = self._split_name(name)
            if parts is None:                   # accounted for, without closing the sample
                yield Sample(name, stray=stray_reason(name), complete=data is not None)
                continue
            key, ext = parts
            if sample is not None and sample.key != key:
                yield sample
                sample = None
            if sample is None:
                sample = Sample(key, duplicate=key in seen)
                seen.add(key)
            if ext in sample.fields or ext in sample.skipped or ext in sample.too_large \
                    or ext in sample.special:
                sample.repeated.append(ext)
            elif data is SKIPPED:
                sample.skipped.append(ext)
            elif data is TOO_LARGE:
                sample.too_large[ext] = members.last_size
            elif data is SPECIAL:
                sample.special[ext] = members.last_kind
            elif data is not None:
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
