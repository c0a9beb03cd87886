"""Read and decode one shard into whole batches of images: the CPU side of a tokenize worker.

`decode_shard` is the one implementation, run either inline in the worker (a one-CPU CPU worker,
where a second process could only time-share its core with the encoder) or inside a decode
process (decode_pool.py) that writes its batches straight into shared memory. The tar is parsed
in the decoding thread; the reader's prefetch thread reads storage blocks ahead (latency
overlaps decoding); every sample becomes either one image in the batch array or one error row.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..samples import Rejection, SamplePolicy, reads_field
from ..shards.reader import MAX_MEMBER_BYTES, Sample, TarShardReader
from .deadline import Deadline
from .commit import kept_field_value


@dataclass(frozen=True)
class DecodeSpec:
    """What a decoder needs to know; small and picklable (sent to decode processes)."""
    channels: int
    resolution: int
    keep_fields: tuple[str, ...]
    batch_size: int
    max_member_bytes: int = MAX_MEMBER_BYTES

    def wants(self, ext: str) -> bool:
        """The fields decoding reads; every other field is streamed past unread."""
        return reads_field(ext, self.keep_fields)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def batch_bytes(self) -> int:
        c, r, _ = self.image_shape
        return self.batch_size * c * r * r


@dataclass
class DecodedBatch:
    """One batch after decoding: `count` images were written to the batch array's first rows, in
    the order of `keys`. Small: it crosses the process boundary pickled, the images do not."""
    count: int = 0
    keys: list[str] = field(default_factory=list)
    kept: dict[str, list] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)   # (key, reason, message)
    samples: int = 0                  # samples read into this batch (images + errors)
    read_s: float = 0.0               # wall seconds the reader spent getting these samples
    decode_s: float = 0.0             # CPU seconds of decoding


@dataclass
class ShardEnd:
    """How a shard's stream ended: `error` is a shard-level error row (damaged, not a tar);
    `failure` a storage error that fails the attempt (it is retried)."""
    error: str | None = None
    bytes_read: int = 0
    failure: str | None = None


class SampleDecoder:
    """Samples -> a DecodedBatch whose images are written into `out` (B, C, R, R) uint8; each
    sample is judged by the one sample policy (pipelines/samples.py)."""

    def __init__(self, spec: DecodeSpec):
        self.policy = SamplePolicy(spec.channels, spec.resolution, spec.keep_fields,
                                   max_member_bytes=spec.max_member_bytes)
        self.keep_fields = list(spec.keep_fields)

    def __call__(self, samples: list[Sample], out: np.ndarray) -> DecodedBatch:
        t0 = time.thread_time()
        batch = DecodedBatch(kept={name: [] for name in self.keep_fields}, samples=len(samples))
        for sample in samples:
            self._one(sample, out, batch)
        batch.decode_s = time.thread_time() - t0
        return batch

    def _one(self, sample: Sample, out: np.ndarray, batch: DecodedBatch) -> None:
        judged = self.policy(sample)
        if isinstance(judged, Rejection):
            batch.errors.append((judged.key, judged.reason, judged.message))
            return
        image, _ = judged                                                   # (C, R, R) uint8
        try:
            values = {name: kept_field_value(name, sample.fields.get(name)) for name in self.keep_fields}
        except (ValueError, UnicodeDecodeError) as e:
            batch.errors.append((sample.key, "bad_kept_field", f"a kept field cannot be stored: {e}"))
            return
        out[batch.count] = image
        batch.count += 1
        batch.keys.append(sample.key)
        for name, value in values.items():
            batch.kept[name].append(value)


class ChunkReader:
    """A shard's samples in chunks of `size`, read in the decoding thread: the reader's own
    prefetch thread overlaps storage at the block level (BlockPrefetcher). After iteration `end`
    says how it ended; a storage error ends it as a failure (the attempt is retried) after the
    chunks read before it. Past `deadline`, the next sample read raises TimeoutError, also when
    it is stuck in storage (the reader's stall check)."""

    def __init__(self, url: str, spec: DecodeSpec, deadline: Deadline | None = None):
        stall_check = (lambda: deadline.check(url)) if deadline is not None else None
        self.reader = TarShardReader(url, spec.wants, spec.max_member_bytes, stall_check)
        self.size = spec.batch_size
        self.failure: BaseException | None = None
        self.deadline = deadline

    def __iter__(self) -> Iterator[tuple[list[Sample], float]]:
        """-> (samples, wall seconds spent reading them)"""
        chunk: list[Sample] = []
        samples = iter(self.reader)
        t0 = time.perf_counter()
        while True:
            try:
                sample = next(samples, None)
            except Exception as e:     # storage errors: the attempt fails and is retried
                if self.deadline is not None and self.deadline.passed():
                    raise
                self.failure = e
                sample = None
            if sample is None:
                break
            if self.deadline is not None:
                self.deadline.check(self.reader.url)
            chunk.append(sample)
            if len(chunk) >= self.size:
                yield chunk, time.perf_counter() - t0
                chunk = []
                t0 = time.perf_counter()
        if chunk and self.failure is None:     # after a failure the attempt is retried anyway
            yield chunk, time.perf_counter() - t0

    @property
    def end(self) -> ShardEnd:
        failure = f"{type(self.failure).__name__}: {self.failure}" if self.failure else None
        return ShardEnd(self.reader.error, self.reader.bytes_read, failure)


Batches = Iterator[tuple[int, np.ndarray, DecodedBatch]]


def decode_shard(url: str, spec: DecodeSpec, decoder: SampleDecoder,
                 next_buffer: Callable[[], tuple[int, np.ndarray]], deadline: Deadline | None = None) -> Batches:
    """Yield (buffer id, images (n, C, R, R) uint8 view of that buffer, batch) per chunk of
    spec.batch_size samples, into the buffers `next_buffer()` hands out; returns the ShardEnd
    (StopIteration.value). Every batch source (inline, decode process) has this shape."""
    chunks = ChunkReader(url, spec, deadline)
    for samples, read_s in chunks:
        slot, out = next_buffer()
        batch = decoder(samples, out)
        batch.read_s = read_s
        yield slot, out[:batch.count], batch
    return chunks.end


class InlineDecoder:
    """Decodes in the calling thread, into one reused buffer (the encoder is done with a batch
    before the next is decoded): one shard at a time, lent like a pool of one decode process."""
    size = 1

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.decoder = SampleDecoder(spec)
        self.buffer = np.empty((spec.batch_size, *spec.image_shape), dtype=np.uint8)
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self):
        with self.lock:
            yield self

    def batches(self, url: str, deadline: Deadline | None = None) -> Batches:
        return decode_shard(url, self.spec, self.decoder, lambda: (0, self.buffer), deadline)

    def close(self) -> None:
        pass
