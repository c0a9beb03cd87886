"""Shard URLs: brace ranges, globs and directories through fsspec -> shard URLs and names.

Every stage (prepare, train, eval, tokenize, verify) lists its shards here. A brace range is
matched against one listing of each directory it names, not an existence check per name.
"""
from __future__ import annotations

import posixpath

import fsspec
from braceexpand import braceexpand

from ..errors import UserError, first_few

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


def shard_name(input_url: str) -> str:
    """'s3://b/train-000001.tar' -> 'train-000001' (the data file's stem)."""
    name = posixpath.basename(input_url.rstrip("/"))
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def list_shards(patterns: list[str]) -> list[tuple[str, str]]:
    """[(url, shard name)]. Refused: two inputs with one name (they would write one file), and
    names no reader could use (see `unusable_name`)."""
    urls = expand_urls(patterns)
    unusable = [(url, why) for url in urls if (why := unusable_name(shard_name(url)))]
    if unusable:
        named = first_few(f"{printable(url)} ({why})" for url, why in unusable)
        raise UserError(f"{len(unusable)} input shard(s) cannot be tokenized under their names: {named}; "
                        "rename them (a name that does not start with '_' or '.', in UTF-8)")
    seen: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise UserError(f"two input shards have the same name {name!r} ({seen[name]} and {url}); "
                            "their outputs would collide in one OUTPUT/<name>.parquet")
        seen[name] = url
    return [(url, name) for name, url in seen.items()]


def unusable_name(shard: str) -> str | None:
    """Why a shard name cannot name a tokenize output, or None. OUTPUT/<name>.parquet of a name
    starting with '_' or '.' (or an empty one) is hidden: pyarrow, pandas, CodesDataset and
    `vqtok inspect` skip it, so its codes would be written and never read. A name that is not
    valid UTF-8 (a file name Python decoded with surrogate escapes) cannot be stored in the
    Parquet `shard` column."""
    from ..output_format import DATA_SUFFIX, is_hidden     # lazy: training lists shards without pyarrow

    if is_hidden(shard + DATA_SUFFIX):
        return "starts with '_' or '.': readers skip such files"
    try:
        shard.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8: cannot be stored in the shard column"
    return None


def printable(url: str) -> str:
    """A URL for a message: undecodable bytes of a file name shown as escapes, not a crash on print."""
    return url.encode("utf-8", "backslashreplace").decode("utf-8")
