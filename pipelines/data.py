"""Shared shard helpers: list WebDataset shard URLs (brace expansion + globs through fsspec)
and iterate/decode the samples of a shard.

A WebDataset shard is a tar whose members are `KEY.EXT`; consecutive members with the same KEY
form one sample ({"__key__": KEY, EXT: bytes, ...}).
"""
from __future__ import annotations

import io
import tarfile
from typing import Iterator

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image

from .errors import UserError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm")
GLOB_CHARS = "*?["


def expand_urls(patterns: list[str]) -> list[str]:
    """['data/train-{000000..000009}.tar', 's3://b/x/*.tar', 'dir/'] -> de-duplicated shard URLs
    (brace ranges in order, glob and directory matches sorted). A directory stands for the .tar
    files inside it. Raises UserError naming the first pattern that matches nothing, or the first
    name of a brace range that does not exist.

    The names of a brace range are checked against ONE listing of each directory they live in,
    not one request per name: at 100k shards on an object store that is a few paginated listings
    instead of 100k round trips."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        items = list(braceexpand(pattern))
        listed = _list_parents([i for i in items if not any(c in i for c in GLOB_CHARS)]) \
            if len(items) > 1 else {}
        found: list[str] = []
        for item in items:
            matches = listed[item] if item in listed else _expand_one(item)
            if not matches and not any(c in item for c in GLOB_CHARS) and item != pattern:
                # an explicit name from a brace range is missing: a gap, not an empty glob
                raise UserError(f"no shard matches {pattern!r}: {item} does not exist")
            found += matches
        if not found:
            raise UserError(f"no shard matches {pattern!r}")
        urls += found
    return list(dict.fromkeys(urls))


def _list_parents(items: list[str]) -> dict[str, list[str]]:
    """{item: [its URL]} for the plain files among `items` (concrete names, no globs), found with
    one listing per parent directory. Items not answered here (missing, directories, a parent that
    cannot be listed, HTTP, whose "listing" is a scraped page) are left to `_expand_one`."""
    groups: dict[tuple[int, str], tuple] = {}     # (filesystem, parent) -> (fs, [(item, path)])
    for item in items:
        try:
            fs, path = fsspec.core.url_to_fs(item)
        except (OSError, ValueError):
            continue
        if _protocol(fs) in ("http", "https") or "/" not in path.rstrip("/"):
            continue
        parent = path.rstrip("/").rsplit("/", 1)[0]
        groups.setdefault((id(fs), parent), (fs, []))[1].append((item, path))
    out: dict[str, list[str]] = {}
    for (_, parent), (fs, members) in groups.items():
        try:
            entries = fs.ls(parent, detail=True)
        except (OSError, ValueError):
            continue
        files = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"}
        for item, path in members:
            if path.rsplit("/", 1)[-1] in files:
                out[item] = [_full_url(fs, item, path)]
    return out


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _expand_one(url: str) -> list[str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if any(c in path for c in GLOB_CHARS):
            paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if p.endswith(".tar"))
        elif fs.exists(path):
            paths = [path]
        else:
            paths = []
    except (OSError, ValueError) as e:
        raise UserError(f"cannot list {url!r}: {e}") from None
    return [_full_url(fs, url, p) for p in paths]


def _full_url(fs, original: str, path: str) -> str:
    if _protocol(fs) in ("file", "local") and "://" not in original:
        return path
    return fs.unstrip_protocol(path)


def iter_tar_samples(url: str, fileobj=None) -> Iterator[dict]:
    """Yield {"__key__", "__url__", ext: bytes, ...} samples of one shard, in stored order.
    A truncated/corrupt tar raises tarfile.TarError or OSError after the good samples."""
    own = fileobj is None
    f = fsspec.open(url, "rb").open() if own else fileobj
    try:
        sample: dict | None = None
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, dot, ext = name.partition(".")
                if not dot:
                    continue
                prefix = member.name[: len(member.name) - len(name)] + key
                if sample is not None and sample["__key__"] != prefix:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": prefix, "__url__": url}
                sample[ext.lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield sample
    finally:
        if own:
            f.close()


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Image bytes -> (C, H, W) uint8 with C = channels (1 grey, 3 RGB). Raises ValueError/OSError
    when the bytes are not a decodable image."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def sample_image_bytes(sample: dict) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None
