"""`vqtok decode`: codes of a tokenize output back to PNG images, one per row.

Layout: OUT/<shard>/<key>.png, each of <shard> and <key> passed through
safe_name (keys come from tar member names and are untrusted: nothing is ever
written outside OUT, and distinct keys get distinct files). OUT/_index.jsonl maps every
(shard, key) to its file, since encoded names can differ from the key. Every file is published
atomically (tokenizer.storage.write_bytes_atomic), the index last: a reader never sees a partial
PNG, and an index names only files that are complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import fsspec
import torch
from tqdm import tqdm

from tokenizer import VQVAE
from tokenizer.storage import join_url, write_bytes_atomic

from .batches import batched
from .errors import UserError
from .output_dir import make_output_dir
from .output_format import OutputMetadata
from .pictures import png_bytes
from .readers import CodesDataset

INDEX_NAME = "_index.jsonl"


@dataclass
class DecodeSummary:
    images: int
    out: str
    index: str
    duplicates: int = 0


def load_tokenizer_for(tokenizer: str, meta: OutputMetadata, codes_url: str,
                       device: str | torch.device = "cpu") -> VQVAE:
    """Load the tokenizer and refuse it unless it is the one the codes were made with."""
    model = VQVAE.from_pretrained(tokenizer, map_location=device)
    sha = model.weights_sha256()
    if sha != meta.tokenizer_sha256:
        raise UserError(f"{tokenizer}: tokenizer weights sha256 {sha[:12]}... differ from the "
                        f"tokenizer_sha256 {meta.tokenizer_sha256[:12]}... that {codes_url} was made "
                        "with; decode with the same tokenizer directory you tokenized with")
    return model


# ---- untrusted keys as file names under OUT ------------------------------------------------------
MAX_NAME_BYTES = 200           # stay well under the usual 255-byte name limit


def safe_name(key: str) -> str:
    """An untrusted key as ONE file name: injective percent-encoding (no '/', NUL, '..', no
    leading '.' or '_'), with over-long names shortened and made unique with a hash of the key."""
    name = quote(key, safe="", encoding="utf-8", errors="surrogatepass")
    if name.startswith((".", "_")):     # '.', '..', hidden files; '_' paths are skipped by readers
        name = f"%{ord(name[0]):02X}" + name[1:]
    if not name:
        name = "%"                      # the empty key; '%' alone cannot come from quote()
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        head = name[: MAX_NAME_BYTES - 40]
        cut = head.rfind("%", len(head) - 2)            # never split a %XX escape
        name = (head[:cut] if cut >= 0 else head) + "%~" + digest
    return name


def safe_output_path(out_dir: str, key: str, suffix: str = "") -> str:
    """A path strictly inside `out_dir` for an untrusted key: '<out_dir>/<safe_name(key)><suffix>'.
    Distinct keys give distinct paths. For local directories the resolved path is checked too."""
    if "/" in suffix or "\x00" in suffix:
        raise ValueError(f"suffix {suffix!r} must be a plain extension")
    path = join_url(out_dir, safe_name(key) + suffix)
    if "://" not in out_dir:
        base = os.path.realpath(out_dir)
        if os.path.dirname(os.path.realpath(path)) != base:   # e.g. a symlink planted in out_dir
            raise UserError(f"{out_dir}: refusing to write key {key[:80]!r} outside the output "
                            f"directory (resolves to {os.path.realpath(path)})")
    return path


# files published at once: each publish waits for a disk flush (fsync), and flushes in flight
# together overlap (docs/design.md has the figure)
WRITERS = 4


class PngWriter:
    """Writes one PNG per (shard, key) under `out`, never outside it; remembers what it wrote.
    Files are published by WRITERS threads; at most 4 * WRITERS PNGs wait in memory."""

    def __init__(self, out: str):
        self.out = out.rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.out)
        self.fs.makedirs(self.root, exist_ok=True)
        self.written: dict[str, tuple[str, str]] = {}
        self.duplicates = 0
        self._shard_dirs: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="decode-writer")
        self._pending: deque[Future] = deque()

    def path_for(self, shard: str, key: str) -> str:
        shard_dir = self._shard_dirs.get(shard)
        if shard_dir is None:
            shard_dir = self._shard_dirs[shard] = safe_output_path(self.out, shard)
            self.fs.makedirs(self.fs._strip_protocol(shard_dir), exist_ok=True)
        return safe_output_path(shard_dir, key, ".png")

    def write(self, shard: str, key: str, png: bytes) -> str | None:
        path = self.path_for(shard, key)
        if path in self.written:    # the same (shard, key) twice: keep the first, say so
            self.duplicates += 1
            return None
        self.written[path] = (shard, key)
        self._pending.append(self._pool.submit(write_bytes_atomic, path, png))
        while len(self._pending) > 4 * WRITERS:
            self._pending.popleft().result()          # re-raises a failed publish
        return path

    def flush(self) -> None:
        """Wait until every PNG so far is published; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def write_index(self) -> str:
        """After every PNG: the index names only published files."""
        self.flush()
        lines = [json.dumps({"shard": s, "key": k, "file": p[len(self.out) + 1:]})
                 for p, (s, k) in self.written.items()]
        path = join_url(self.out, INDEX_NAME)
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
        return path


def decode_output(tokenizer: str, codes: str, out: str, limit: int | None = None,
                  batch_size: int = 256, device: str | None = None) -> DecodeSummary:
    if limit is not None and limit < 0:
        raise UserError(f"--limit {limit}: must be >= 0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = CodesDataset(codes, rank=0, world_size=1, fields=("shard",))
    model = load_tokenizer_for(tokenizer, dataset.metadata, codes, device)
    make_output_dir(out, "--out")
    writer = PngWriter(out)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    try:
        with tqdm(total=total, desc="decode", unit="img", file=sys.stderr) as bar:
            for batch in batched(dataset, batch_size, total):
                images = model.decode(torch.stack([r["codes"] for r in batch]).to(device)).cpu()  # (B, C, H, W)
                for row, image in zip(batch, images):
                    writer.write(row["shard"], row["key"], png_bytes(image))
                bar.update(len(batch))
        index = writer.write_index()
    finally:
        writer.close()
    if writer.duplicates:
        print(f"warning: {writer.duplicates} rows repeat a (shard, key) already decoded; "
              "kept the first of each", file=sys.stderr)
    return DecodeSummary(images=len(writer.written), out=out, index=index, duplicates=writer.duplicates)
