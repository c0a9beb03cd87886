"""Tokenize one shard: decode (inline or in a decode process) -> encode (shared) -> write.

A worker runs several shards at once, one per decode process (decode_pool.py): each shard's
thread takes whole batches of decoded images from its process and encodes them under one lock,
so the accelerator (or the CPU encoder) sees one batch after another from whichever shard has
one ready, while every decode process keeps decoding ahead into its free buffers.
"""
from __future__ import annotations

import collections
import os
import socket
import threading
import time

import numpy as np

from ..output_format import FORMAT_VERSION, OutputMetadata, data_path
from ..shards.reader import MAX_MEMBER_BYTES
from .deadline import Deadline
from .shard_decoder import DecodeSpec, InlineDecoder, ShardEnd
from .decode_pool import DecodePool
from .encoder import CodeEncoder
from .commit import ShardCommitter, codes_table, parquet_bytes


class ShardTokenizer:
    """Shards end to end; `run` returns a shard's manifest (also written as its commit marker).
    decode_processes=0 decodes in the calling thread (one shard at a time); N > 0 runs N decode
    processes, and up to N shards at once. `shard_timeout` (seconds, None = none): an attempt
    not read and decoded that long after it got a decode process raises TimeoutError."""

    def __init__(self, encoder: CodeEncoder, meta: OutputMetadata, output: str, keep_fields: list[str],
                 batch_size: int, decode_processes: int, max_member_bytes: int | None = None,
                 lease_id: str | None = None, shard_timeout: float | None = None):
        self.encoder = encoder
        self.shard_timeout = shard_timeout
        self.meta = meta
        self.output = output
        self.keep_fields = list(keep_fields)
        self.spec = DecodeSpec(encoder.channels, encoder.resolution, tuple(self.keep_fields),
                               max(batch_size, 1), max_member_bytes or MAX_MEMBER_BYTES)
        self.decoders = DecodePool(self.spec, decode_processes) if decode_processes > 0 else InlineDecoder(self.spec)
        self.encode_lock = threading.Lock()
        self.committer = ShardCommitter(output, lease_id)
        self._warm_up_writer()

    def _warm_up_writer(self) -> None:
        """Build one empty data file before the first shard: pyarrow's first array conversion
        imports pandas and its codecs (~0.2 s), a cost of start-up, not of the first shard."""
        empty = np.zeros((0, self.meta.num_codes), self.encoder.code_dtype)
        parquet_bytes(codes_table(self.meta, "warm-up", [], empty, {n: [] for n in self.keep_fields}))

    @property
    def slots(self) -> int:
        """Shards this tokenizer works on at once."""
        return self.decoders.size

    def close(self) -> None:
        self.decoders.close()

    def run(self, url: str, shard: str, attempt: int = 1) -> dict:
        queued0 = time.perf_counter()
        res = {"keys": [], "codes": [], "kept": {n: [] for n in self.keep_fields}, "errors": [],
               "read": 0.0, "decode": 0.0, "encode": 0.0, "encode_wait": 0.0, "read_samples": 0}
        with self.decoders.acquire() as source:
            # the shard's wall time starts here: a call queued behind the worker's slots waits
            # above, and that wait is not this shard's work
            wall0 = time.perf_counter()
            res["queued"] = wall0 - queued0
            batches = source.batches(url, Deadline.after(self.shard_timeout))
            while True:
                try:
                    _, images, batch = next(batches)
                except StopIteration as stop:
                    end: ShardEnd = stop.value
                    break
                self._encode(images, batch, res)
        if end.failure:
            raise OSError(f"reading {url} failed: {end.failure}")
        return self._write(url, shard, attempt, end, res, wall0)

    def _encode(self, images: np.ndarray, batch, res: dict) -> None:
        res["read"] += batch.read_s
        res["decode"] += batch.decode_s
        res["read_samples"] += batch.samples
        res["errors"] += batch.errors
        if batch.count:
            t0 = time.perf_counter()
            with self.encode_lock:
                t1 = time.perf_counter()
                res["codes"].append(self.encoder.encode(images))      # (n, h*w), a copy
                t2 = time.perf_counter()
            res["encode_wait"] += t1 - t0
            res["encode"] += t2 - t1
            res["keys"] += batch.keys
            for name in self.keep_fields:
                res["kept"][name] += batch.kept[name]

    def _write(self, url, shard, attempt, end: ShardEnd, res, wall0) -> dict:
        t0 = time.perf_counter()
        width = self.meta.num_codes
        codes = np.concatenate(res["codes"]) if res["codes"] else np.zeros((0, width), self.encoder.code_dtype)
        table = codes_table(self.meta, shard, res["keys"], codes, res["kept"])
        errors = [(shard, key, msg) for key, _, msg in res["errors"]]
        if end.error:
            errors.append((shard, None, end.error))
        by_reason = collections.Counter(reason for _, reason, _ in res["errors"])
        manifest = {
            "version": FORMAT_VERSION, "shard": shard, "input": url,
            "tokenizer_sha256": self.encoder.sha256,
            "counts": {"read": res["read_samples"], "ok": len(res["keys"]), "failed": len(res["errors"]),
                       "failed_by_reason": dict(sorted(by_reason.items())),
                       "shard_errors": 1 if end.error else 0},
            "shard_error": end.error,
            "durations_s": {"read": round(res["read"], 4), "decode": round(res["decode"], 4),
                            "encode": round(res["encode"], 4), "encode_wait": round(res["encode_wait"], 4),
                            "queued": round(res["queued"], 4)},
            "attempt": attempt,
            "worker": {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.encoder.device),
                       "decode_processes": self.decoders.size if isinstance(self.decoders, DecodePool) else 0},
        }
        manifest["files"] = self.committer.commit_data(shard, parquet_bytes(table),   # {"data", "errors"} digests
                                                       data_path(self.output, shard), errors)
        manifest["durations_s"]["write"] = round(time.perf_counter() - t0, 4)
        manifest["durations_s"]["wall"] = round(time.perf_counter() - wall0, 4)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.committer.commit_manifest(shard, manifest)
        return manifest
