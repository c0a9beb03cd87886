"""Tokenize one shard: read (thread) -> decode (thread pool) -> encode (this thread) -> write.

The reader streams the tar into chunks of `batch_size` samples; chunks are decoded in a pool
while the previous chunk is being encoded, so CPU decoding overlaps the encoder (and the GPU
never waits for PIL when the pool keeps up).
"""
from __future__ import annotations

import collections
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..output_format import FORMAT_VERSION, OutputMetadata, data_path
from .encoder import CodeEncoder
from .preprocess import ImageError, ImagePreprocessor, find_image
from .shards import Sample, TarShardReader
from .writer import ShardCommitter, codes_table, kept_field_value, parquet_bytes

_END = object()


@dataclass
class Decoded:
    """One chunk after decoding: good images with their keys and kept fields, and errors."""
    keys: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    kept: dict[str, list] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)   # (key, reason, message)
    seconds: float = 0.0


class ChunkDecoder:
    """Samples -> Decoded; every sample becomes either one good image or one error."""

    def __init__(self, preprocess: ImagePreprocessor, keep_fields: list[str]):
        self.preprocess = preprocess
        self.keep_fields = keep_fields

    def __call__(self, samples: list[Sample]) -> Decoded:
        t0 = time.thread_time()
        out = Decoded(kept={name: [] for name in self.keep_fields})
        for sample in samples:
            self._one(sample, out)
        out.seconds = time.thread_time() - t0
        return out

    def _one(self, sample: Sample, out: Decoded) -> None:
        if sample.duplicate:
            out.errors.append((sample.key, "duplicate_key",
                               "duplicate key: an earlier sample of this shard has the same key; skipped"))
            return
        if not sample.complete:
            out.errors.append((sample.key, "incomplete_sample",
                               "sample may be incomplete: the tar is damaged inside or right after it"))
            return
        found = find_image(sample.fields)
        if found is None:
            have = ", ".join(sorted(sample.fields)) or "nothing"
            out.errors.append((sample.key, "no_image", f"no image in sample (found: {have})"))
            return
        try:
            image = self.preprocess(found[1], found[0])
            values = {name: kept_field_value(name, sample.fields.get(name)) for name in self.keep_fields}
        except ImageError as e:
            out.errors.append((sample.key, e.reason, str(e)))
            return
        except (ValueError, UnicodeDecodeError) as e:
            out.errors.append((sample.key, "bad_kept_field", f"a kept field cannot be stored: {e}"))
            return
        out.keys.append(sample.key)
        out.images.append(image)
        for name, value in values.items():
            out.kept[name].append(value)


class ShardTokenizer:
    """One shard end to end; returns its manifest (also written as the commit marker)."""

    def __init__(self, encoder: CodeEncoder, meta: OutputMetadata, output: str, keep_fields: list[str],
                 batch_size: int, decode_threads: int):
        self.encoder = encoder
        self.meta = meta
        self.output = output
        self.keep_fields = list(keep_fields)
        self.batch_size = max(batch_size, 1)
        self.decoder = ChunkDecoder(ImagePreprocessor(encoder.channels, encoder.resolution), self.keep_fields)
        # decode_threads=0: decode in the encoding thread (a one-CPU CPU worker, where a decode
        # thread could only time-share the core with the encoder)
        self.pool = (ThreadPoolExecutor(decode_threads, thread_name_prefix="vqtok-decode")
                     if decode_threads > 0 else None)
        self.depth = max(1, decode_threads) + 1      # chunks in flight ahead of the encoder
        self.committer = ShardCommitter(output)

    def run(self, url: str, shard: str, attempt: int = 1) -> dict:
        wall0 = time.perf_counter()
        reader = TarShardReader(url)
        chunks: queue.Queue = queue.Queue(maxsize=self.depth + 1)
        stats = {"read": 0.0}
        thread = threading.Thread(target=self._read, args=(reader, chunks, stats), daemon=True)
        thread.start()
        result = self._decode_and_encode(chunks)
        thread.join()
        if "exception" in stats:
            raise stats["exception"]
        return self._write(url, shard, attempt, reader, result, stats["read"], wall0)

    def _read(self, reader: TarShardReader, chunks: queue.Queue, stats: dict) -> None:
        seen: set[str] = set()
        batch: list[Sample] = []
        t0 = time.perf_counter()
        try:
            for sample in reader:
                sample.duplicate = sample.key in seen   # a second row for one key: refused
                seen.add(sample.key)
                batch.append(sample)
                if len(batch) >= self.batch_size:
                    stats["read"] += time.perf_counter() - t0
                    chunks.put(batch)
                    t0 = time.perf_counter()
                    batch = []
            stats["read"] += time.perf_counter() - t0
            if batch:
                chunks.put(batch)
        except BaseException as e:  # storage errors: the attempt fails and is retried
            stats["exception"] = e
        finally:
            chunks.put(_END)

    def _decode_and_encode(self, chunks: queue.Queue) -> dict:
        pending: collections.deque = collections.deque()
        res = {"keys": [], "codes": [], "kept": {n: [] for n in self.keep_fields}, "errors": [],
               "decode": 0.0, "encode": 0.0, "read_samples": 0}
        done = False
        while not done or pending:
            while not done and len(pending) < self.depth:
                item = chunks.get()
                if item is _END:
                    done = True
                    break
                res["read_samples"] += len(item)
                if self.pool is None:
                    self._encode(self.decoder(item), res)
                else:
                    pending.append(self.pool.submit(self.decoder, item))
            if pending:
                self._encode(pending.popleft().result(), res)
        return res

    def _encode(self, dec: Decoded, res: dict) -> None:
        res["decode"] += dec.seconds
        res["errors"] += dec.errors
        if dec.images:
            t0 = time.perf_counter()
            res["codes"].append(self.encoder.encode(np.stack(dec.images)))
            res["encode"] += time.perf_counter() - t0
            res["keys"] += dec.keys
            for name in self.keep_fields:
                res["kept"][name] += dec.kept[name]

    def _write(self, url, shard, attempt, reader, res, read_s, wall0) -> dict:
        t0 = time.perf_counter()
        width = self.meta.num_codes
        codes = np.concatenate(res["codes"]) if res["codes"] else np.zeros((0, width), self.encoder.code_dtype)
        table = codes_table(self.meta, shard, res["keys"], codes, res["kept"])
        errors = [(shard, key, msg) for key, _, msg in res["errors"]]
        if reader.error:
            errors.append((shard, None, reader.error))
        by_reason = collections.Counter(reason for _, reason, _ in res["errors"])
        manifest = {
            "version": FORMAT_VERSION, "shard": shard, "input": url,
            "tokenizer_sha256": self.encoder.sha256,
            "counts": {"read": res["read_samples"], "ok": len(res["keys"]), "failed": len(res["errors"]),
                       "failed_by_reason": dict(sorted(by_reason.items())),
                       "shard_errors": 1 if reader.error else 0},
            "shard_error": reader.error,
            "durations_s": {"read": round(read_s, 4), "decode": round(res["decode"], 4),
                            "encode": round(res["encode"], 4)},
            "attempt": attempt,
            "worker": {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.encoder.device)},
        }
        manifest["files"] = self.committer.commit_data(shard, parquet_bytes(table),   # {"data", "errors"} digests
                                                       data_path(self.output, shard), errors)
        manifest["durations_s"]["write"] = round(time.perf_counter() - t0, 4)
        manifest["durations_s"]["wall"] = round(time.perf_counter() - wall0, 4)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.committer.commit_manifest(shard, manifest)
        return manifest

