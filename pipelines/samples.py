"""The one sample policy: a shard's Sample -> its image, or the named reason it has none.

Tokenize (an error row per rejected sample), training (counted and skipped) and eval (counted
in `skipped`) all decide through `SamplePolicy`, so the three agree on every odd input. The
checks run in this order; the first that applies is the sample's reason:

  stray_member       a member of no sample: a hidden name ('.x.png') or no extension ('README')
  invalid_key        the key is not valid UTF-8 (it is stored escaped in the error row)
  duplicate_key      an earlier sample of this shard has the same key
  incomplete_sample  the tar is damaged inside or right after the sample
  duplicate_field    a field is stored twice in the sample ('k1.png', 'k1.png'): ambiguous
  unsupported_member a wanted field is a link, device, FIFO or sparse file, not a regular file
  member_too_large   a wanted field is over the member size limit (never read into memory)
  no_image           no image field (the fields that were there are named)
  empty_image, undecodable_image, image_too_large, channel_mismatch, size_mismatch
                     from the image policy (pipelines/images.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import ImageError, ImagePreprocessor, find_image, is_image_field
from .shards.reader import MAX_MEMBER_BYTES, Sample

REASONS = ("stray_member", "invalid_key", "duplicate_key", "incomplete_sample", "duplicate_field",
           "unsupported_member", "member_too_large", "no_image", "empty_image", "undecodable_image",
           "image_too_large", "channel_mismatch", "size_mismatch")


@dataclass(frozen=True)
class Rejection:
    """Why a sample has no usable image. `key` is printable (valid UTF-8, escaped if need be);
    `found` is what a strict image check found ((channels, mode) or (w, h)), else None."""
    key: str
    reason: str
    message: str
    found: object = None


def reads_field(ext: str, wanted: tuple[str, ...] = ()) -> bool:
    """The fields a reader must hold for a stage that wants images and `wanted`; every other
    field is streamed past unread."""
    return is_image_field(ext) or ext in wanted


def printable(text: str) -> str:
    """A str read from a tar (undecodable bytes kept as surrogates) -> valid UTF-8 text, the
    undecodable bytes written as \\xNN. Arrow and JSON writers refuse lone surrogates."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_printable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class SamplePolicy:
    """Sample -> (image (C, R, R) uint8, its field name) | Rejection.

    `wanted` are the fields the stage reads besides images (tokenize's kept fields): a problem
    with one of them (a link, too large, repeated) rejects the sample like one with its image;
    other fields are never read and do not matter. strict=True refuses images whose own channel
    count or size differ from the model's (training data that must already match)."""

    def __init__(self, channels: int, resolution: int, wanted: tuple[str, ...] = (),
                 strict: bool = False, max_member_bytes: int | None = MAX_MEMBER_BYTES):
        self.preprocess = ImagePreprocessor(channels, resolution, strict=strict)
        self.wanted = tuple(wanted)
        self.max_member_bytes = max_member_bytes

    def wants(self, ext: str) -> bool:
        return reads_field(ext, self.wanted)

    def __call__(self, sample: Sample) -> tuple[np.ndarray, str] | Rejection:
        rejection = self.check(sample)
        if rejection is not None:
            return rejection
        found = find_image(sample.fields)
        if found is None:
            return Rejection(sample.key, "no_image",
                             f"no image in sample (found: {printable(', '.join(sample.present())) or 'nothing'})")
        ext, data = found
        try:
            return self.preprocess(data, ext), ext                          # (C, R, R) uint8
        except ImageError as e:
            return Rejection(sample.key, e.reason, str(e), e.found)

    def check(self, sample: Sample) -> Rejection | None:
        """Everything but decoding the image: the reasons up to member_too_large, in order."""
        key = sample.key
        if sample.stray is not None:
            return Rejection(printable(key), "stray_member", f"{sample.stray}; not read")
        if not is_printable(key):
            return Rejection(printable(key), "invalid_key", "the key is not valid UTF-8 (shown "
                             "with \\xNN escapes); a key must be text to be stored")
        if sample.duplicate:
            return Rejection(key, "duplicate_key", "duplicate key: an earlier sample of this shard "
                             "has the same key; skipped")
        if not sample.complete:
            return Rejection(key, "incomplete_sample", "sample may be incomplete: the tar is damaged "
                             "inside or right after it")
        repeated = sorted({ext for ext in sample.repeated if self.wants(ext)})
        if repeated:
            return Rejection(key, "duplicate_field", f"field(s) {_names(repeated)} stored twice in the "
                             "sample: which one is meant is ambiguous")
        special = [ext for ext in sample.special if self.wants(ext)]
        if special:
            kinds = ", ".join(f"'{printable(ext)}' is a {sample.special[ext]}" for ext in special)
            return Rejection(key, "unsupported_member", f"{kinds}: only regular files are read")
        large = [ext for ext in sample.too_large if self.wants(ext)]
        if large:
            sizes = ", ".join(f"'{printable(ext)}' {sample.too_large[ext]:,} bytes" for ext in large)
            return Rejection(key, "member_too_large", f"field too large: {sizes} "
                             f"(limit {self.max_member_bytes or 0:,} bytes); not read")
        return None


def _names(exts: list[str]) -> str:
    return ", ".join(f"'{printable(ext)}'" for ext in exts)
