"""Reading and decoding one shard (pipelines/tokenize/shard_decoder.py): memory stays bounded by the
fields decoding asked for, however far a shard inflates; a shard that crawls is stopped at its
deadline."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import fsspec
import pytest

import tok_data as td

MiB = 1 << 20


class Zeros:
    """A file object of n zero bytes, never held whole."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def _gzip_shard(path, members: list[tuple[str, int | bytes]]) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            tar.addfile(info, Zeros(data) if isinstance(data, int) else __import__("io").BytesIO(data))


MEASURE = r"""
import json, resource, sys
from pipelines.tokenize.shard_decoder import DecodeSpec, InlineDecoder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dec = InlineDecoder(DecodeSpec(1, 28, ("cls",), 8, max_member_bytes=int(sys.argv[2])))
gen = dec.batches(sys.argv[1])
keys, errors = [], []
while True:
    try:
        _, _, batch = next(gen)
    except StopIteration as stop:
        end = stop.value
        break
    keys += batch.keys
    errors += batch.errors
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"keys": keys, "errors": errors, "end_error": end.error, "grown_kib": grown}))
"""


def test_a_shard_inflating_to_gigabytes_keeps_its_images_and_bounded_memory(tmp_path):
    images, labels = td.fashion_mnist(3)
    path = tmp_path / "bomb.tar.gz"
    _gzip_shard(path, [
        ("a.png", td.png(images[0])), ("a.cls", b"1"), ("a.blob", 900 * MiB),   # unwanted field
        ("b.png", 300 * MiB), ("b.cls", b"2"),                                  # image over the limit
        ("c.png", td.png(images[2])), ("c.cls", b"3"),
    ])
    assert path.stat().st_size < 8 * MiB
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(256 * MiB)], check=True,
                         capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout)
    assert result["keys"] == ["a", "c"] and result["end_error"] is None
    assert len(result["errors"]) == 1
    key, reason, message = result["errors"][0]
    assert (key, reason) == ("b", "member_too_large")
    assert "'png' 314,572,800 bytes" in message and "limit 268,435,456" in message
    assert result["grown_kib"] < 200 * 1024, result["grown_kib"]      # 1.2 GiB inflated, < 200 MiB held


def test_no_image_error_names_the_fields_that_were_streamed_past(tmp_path):
    path = tmp_path / "text.tar"
    td.write(path, td.tar_bytes([("t", {"txt": b"hello", "json": b"{}"})]))
    from pipelines.tokenize.shard_decoder import DecodeSpec, InlineDecoder
    gen = InlineDecoder(DecodeSpec(1, 28, (), 8)).batches(str(path))
    _, _, batch = next(gen)
    assert batch.errors == [("t", "no_image", "no image in sample (found: json, txt)")]


class _CrawlingFile(io.RawIOBase):
    """A storage that crawls: `chunk` bytes per read, each after `delay` seconds."""

    def __init__(self, data: bytes, chunk: int = 2048, delay: float = 0.02):
        self.data, self.pos, self.chunk, self.delay = data, 0, chunk, delay

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        time.sleep(self.delay)
        piece = self.data[self.pos:self.pos + min(len(b), self.chunk)]
        b[:len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


class _CrawlingFS(fsspec.AbstractFileSystem):
    protocol = "vqtokcrawl"
    files: dict[str, bytes] = {}

    def _open(self, path, mode="rb", **kwargs):
        return _CrawlingFile(self.files[self._strip_protocol(path)])


fsspec.register_implementation("vqtokcrawl", _CrawlingFS, clobber=True)


def test_the_inline_decoder_stops_a_crawling_shard_at_its_deadline():
    from pipelines.tokenize.deadline import Deadline
    from pipelines.tokenize.shard_decoder import DecodeSpec, InlineDecoder

    images, labels = td.fashion_mnist(40)
    _CrawlingFS.files["c.tar"] = td.tar_bytes(td.fmnist_samples(images, labels, "c-"))   # ~50 reads
    decoder = InlineDecoder(DecodeSpec(1, 28, ("cls",), 8))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^vqtokcrawl://c.tar: not read and decoded within --shard-timeout 0.3 s"):
        for _ in decoder.batches("vqtokcrawl://c.tar", Deadline.after(0.3)):
            pass
    assert 0.3 <= time.monotonic() - t0 < 0.3 + 1.0
    # no deadline: the same shard is read to its end, and the decoder is still usable
    assert sum(batch.count for _, _, batch in decoder.batches("vqtokcrawl://c.tar")) == 40


def test_the_inline_decoder_stops_a_shard_whose_open_never_returns(tmp_path):
    """A FIFO nobody writes blocks in open(): the open happens in the reader's prefetch thread, and
    the decoding thread's wait is cut by the deadline (a watchdog writer unblocks it otherwise)."""
    import os
    import threading
    import time

    from pipelines.tokenize.deadline import Deadline
    from pipelines.tokenize.shard_decoder import DecodeSpec, InlineDecoder

    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    watchdog = threading.Timer(8.0, lambda: open(fifo, "wb").close())
    watchdog.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="not read and decoded within --shard-timeout 1 s"):
            for _ in InlineDecoder(DecodeSpec(1, 28, (), 8)).batches(str(fifo), Deadline.after(1.0)):
                pass
        assert time.monotonic() - t0 < 4.0
    finally:
        watchdog.cancel()
        try:                                   # release the prefetch thread still in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
