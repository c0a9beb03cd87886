"""A streaming tar member parser for WebDataset shards, several times cheaper per member than
tarfile's stream mode (figures in docs/design.md).

It reads big blocks (decompressing gzip/bz2/xz on the fly), parses ustar/GNU/pax headers the
way tarfile does (checksum, base-256 sizes, ustar prefix, GNU long names, pax path/size) and
reports how the stream ended: the zero-block end-of-archive marker, or the damage that stopped
it. Storage errors (OSError from the file object) propagate; damage never raises.

Memory stays bounded by the members a caller wants: a member `want(name)` refuses is streamed
past without being held (SKIPPED), and one larger than `max_member_bytes` likewise (TOO_LARGE),
so a shard that inflates to gigabytes of unwanted or oversized fields costs CPU, not memory.
"""
from __future__ import annotations

import bz2
import lzma
import queue
import threading
import zlib
from typing import Iterator

BLOCK = 512
READ_SIZE = 4 << 20
END_MARKER = "marker"
FILE_TYPES = (b"0", b"\0", b"7")          # regular, old regular, contiguous
GNU_TYPES = (b"L", b"K", b"S")             # long name, long link, sparse: no ustar prefix
META_TYPES = (b"L", b"K", b"x", b"X", b"g")   # describe the next member; held to be parsed
MAX_META_BYTES = 1 << 20                   # a long name or pax header larger than this is damage
# members that are no regular file; tarfile reads no data for them whatever the size field says
SPECIAL_TYPES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
                 b"4": "block device", b"6": "FIFO"}
DIR_TYPE = b"5"


class _Marker:
    """Stands for a member's data that was not read into memory."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


SKIPPED = _Marker("SKIPPED")        # not wanted by the caller
TOO_LARGE = _Marker("TOO_LARGE")    # over max_member_bytes; `last_size` holds its size
SPECIAL = _Marker("SPECIAL")        # no regular file (link, device, FIFO, sparse, unknown type);
                                    # `last_kind` says which


class BlockPrefetcher:
    """A file's blocks read ahead in a thread: `read()` hands out the next block of up to
    READ_SIZE bytes (b'' at the end) while the thread already waits on storage for the ones after.
    Storage latency (object stores, a cold disk) thus overlaps parsing and decoding, at one
    interpreter-lock hand-off per block: a sample-level reader thread costs one per sample,
    which measured 16% slower than no thread on small images (docs/design.md).

    All storage work happens in the thread: `open_file()` (which may block, e.g. on a FIFO) and
    every read; the thread closes the file when it ends. A storage error raised there is raised
    by the `read()` that reaches it (an error of `open_file` as OpenFailed). While `read()` waits,
    it calls `stall_check()` every STALL_POLL_S seconds, so a caller's deadline can end a read
    that never returns. `close()` stops the thread after the read it is in, waiting at most
    CLOSE_WAIT_S for it (a read stuck in storage is left to finish on its own)."""

    STALL_POLL_S = 0.5
    CLOSE_WAIT_S = 0.5

    def __init__(self, open_file, ahead: int = 2, stall_check=None):
        self.open_file = open_file
        self.stall_check = stall_check
        self.blocks: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="vqtok-prefetch")
        self.thread.start()

    def _run(self) -> None:
        try:
            f = self.open_file()
        except BaseException as e:       # handed to the reader, raised there
            self._put(OpenFailed(e))
            return
        try:
            while not self.stop.is_set():
                block = f.read(READ_SIZE)
                if not self._put(block):
                    return
                if not block:
                    return
        except BaseException as e:
            self._put(e)
        finally:
            f.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        if self.done:
            return b""
        while True:
            try:
                item = self.blocks.get(timeout=self.STALL_POLL_S)
                break
            except queue.Empty:
                if self.stall_check is not None:
                    self.stall_check()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if not item:
            self.done = True
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(self.CLOSE_WAIT_S)


class OpenFailed(Exception):
    """The file could not be opened; `cause` is what opening raised."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class TarDamage(Exception):
    """The bytes are not (or no longer) a readable tar stream."""


class _Decompressed:
    """File object -> its bytes, transparently decompressed when gzip, bz2 or xz."""

    def __init__(self, f):
        self.f = f
        self.pending = f.read(READ_SIZE)
        head = self.pending[:6]
        if head[:2] == b"\x1f\x8b":
            self.new = lambda: zlib.decompressobj(wbits=31)
        elif head[:3] == b"BZh":
            self.new = bz2.BZ2Decompressor
        elif head == b"\xfd7zXZ\x00":
            self.new = lzma.LZMADecompressor
        else:
            self.new = None
        self.codec = self.new() if self.new else None
        self.raw_eof = False

    def read(self) -> bytes:
        """The next piece of decompressed bytes, at most READ_SIZE of them (a stream that
        inflates a thousandfold must not inflate in memory); b'' at the end."""
        while True:
            if self.codec is not None and not getattr(self.codec, "needs_input", True) \
                    and not _finished(self.codec):
                out = self._decompress(b"")      # bz2/lzma still hold output for their input
                if out:
                    return out
                continue
            raw = self.pending if self.pending else (b"" if self.raw_eof else self.f.read(READ_SIZE))
            self.pending = b""
            if not raw:
                self.raw_eof = True
                if self.codec is not None and not _finished(self.codec):
                    raise TarDamage("compressed stream ends early")
                return b""
            if self.codec is None:
                return raw
            out = self._decompress(raw)
            if out:
                return out

    def _decompress(self, raw: bytes) -> bytes:
        try:
            if isinstance(self.codec, _ZLIB_TYPE):
                out = self.codec.decompress(raw, READ_SIZE)
                self.pending = self.codec.unconsumed_tail   # input left for the next call
            else:
                out = self.codec.decompress(raw, max_length=READ_SIZE)
            rest = self.codec.unused_data if _finished(self.codec) else b""
            if rest:                      # concatenated streams (e.g. multi-member gzip)
                self.codec = self.new()
                self.pending = rest
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as e:
            raise TarDamage(f"invalid compressed data ({e})") from None
        return out


_ZLIB_TYPE = type(zlib.decompressobj())


def _finished(codec) -> bool:
    return bool(getattr(codec, "eof", False))


class TarMembers:
    """Iterate (member name, data) of every member but directories, in stored order. data is
    the bytes of a regular file; None for a last member cut short; SKIPPED for a member `want`
    refuses; TOO_LARGE for one over `max_member_bytes` (its size in `last_size`); SPECIAL for a
    member that is no regular file (its kind in `last_kind`). Afterwards `end` is END_MARKER
    for a proper end-of-archive or a reason, and `offset` the bytes consumed.

    It cannot loop or read backwards: every header consumes its block and sizes are never
    negative (a negative one is damage), so `offset` grows with every member. Only metadata
    members (long names, pax headers, at most MAX_META_BYTES each) are held whatever `want`
    says; any other data is held only when wanted and within `max_member_bytes`."""

    def __init__(self, f, want=None, max_member_bytes: int | None = None):
        self.f = f
        self.want = want
        self.max_member_bytes = max_member_bytes
        self.last_size = 0
        self.last_kind = ""
        self.end: str | None = None
        self.offset = 0
        self._buf = bytearray()
        self._pos = 0
        self._source: _Decompressed | None = None

    # ---- buffer ---------------------------------------------------------------------------------
    def _fill(self, n: int) -> bool:
        """Make n unread bytes available; False when the stream ends first."""
        while len(self._buf) - self._pos < n:
            if self._pos > READ_SIZE:
                del self._buf[:self._pos]
                self._pos = 0
            piece = self._source.read()
            if not piece:
                return False
            self._buf += piece
        return True

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:          # one copy, not slice + bytes()
            out = bytes(view[self._pos:self._pos + n])
        self._skip(n)
        return out

    def _skip(self, n: int) -> None:
        self._pos += n
        self.offset += n

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _discard(self, n: int) -> bool:
        """Consume n bytes without holding them; False when the stream ends first."""
        while n > 0:
            if not self._available():
                del self._buf[:]
                self._pos = 0
                piece = self._source.read()
                if not piece:
                    return False
                self._buf += piece
            step = min(n, self._available())
            self._skip(step)
            n -= step
        return True

    # ---- members --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        try:
            self._source = _Decompressed(self.f)
            yield from self._members()
        except TarDamage as e:
            self.end = str(e)

    def _members(self) -> Iterator[tuple[str, bytes]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = self._header()
            if header is None:
                return
            name, size, kind = header
            if kind in META_TYPES:
                data = self._metadata(name, size, kind)
                if kind == b"L":
                    long_name = _text(data.split(b"\0", 1)[0])
                elif kind in (b"x", b"X"):
                    pax = _pax_records(data)
                    if "size" in pax:
                        pax["size"] = str(_pax_size(pax["size"]))
                continue
            if "size" in pax and kind not in SPECIAL_TYPES and kind != DIR_TYPE:
                size = int(pax["size"])
            name = pax.get("path", long_name or name)
            long_name, pax = None, {}
            if kind == DIR_TYPE or (name.endswith("/") and kind in FILE_TYPES):
                if not self._discard(_padded(size)):
                    self.end = f"unexpected end of data in directory {name!r}"
                    return
                continue
            marker = self._not_held(name, size, kind)
            if marker is not None:
                if not self._discard(_padded(size)):
                    self.end = f"unexpected end of data in member {name!r} (of {size} bytes)"
                    yield name, None
                    return
                yield name, marker
                continue
            if not self._fill(_padded(size)):
                self.end = (f"unexpected end of data in member {name!r} "
                            f"({self._available()} of {size} bytes)")
                yield name, None                 # its sample is damaged
                return
            data = self._take(size)
            self._skip(_padded(size) - size)
            yield name, data

    def _metadata(self, name: str, size: int, kind: bytes) -> bytes:
        """The data of a long-name or pax member, bounded: these are held whatever `want` says."""
        if size > MAX_META_BYTES:
            raise TarDamage(f"{_META_NAMES[kind]} of {size} bytes (limit {MAX_META_BYTES})")
        if not self._fill(_padded(size)):
            raise TarDamage(f"unexpected end of data in {_META_NAMES[kind]} {name!r}")
        data = self._take(size)
        self._skip(_padded(size) - size)
        return data

    def _not_held(self, name: str, size: int, kind: bytes):
        """SPECIAL / SKIPPED / TOO_LARGE when this member's data is not to be held, else None."""
        if kind not in FILE_TYPES:
            self.last_kind = SPECIAL_TYPES.get(kind) or \
                ("GNU sparse file" if kind == b"S" else f"member of unknown type {kind!r}")
            return SPECIAL
        if self.want is not None and not self.want(name):
            return SKIPPED
        if self.max_member_bytes is not None and size > self.max_member_bytes:
            self.last_size = size
            return TOO_LARGE
        return None

    def _header(self) -> tuple[str, int, bytes] | None:
        """Parse the next header; None at the end (self.end says why)."""
        if not self._fill(BLOCK):
            if self._available():
                self.end = "truncated member header"
            elif self.offset == 0:
                self.end = "empty file"
            else:
                self.end = "no end-of-archive marker (file ends at a block boundary)"
            return None
        with memoryview(self._buf) as view:          # peek: a bad header is not consumed
            block = bytes(view[self._pos:self._pos + BLOCK])
        if block.count(0) == BLOCK:
            self.end = END_MARKER
            return None
        try:
            stored = _number(block[148:156])
        except ValueError:
            stored = -1
        if not _checksum_ok(block, stored):
            self.end = "bad checksum"
            return None
        kind = block[156:157]
        try:
            size = _number(block[124:136])
        except ValueError:
            self.end = "bad size field"
            return None
        if kind in SPECIAL_TYPES or kind == DIR_TYPE:
            size = 0                    # tarfile skips no data for these whatever the field says
        elif size < 0:                  # base-256 can say so; reading it would step backwards
            self.end = f"negative size field ({size}) in a member header"
            return None
        name = _text(block[:100].split(b"\0", 1)[0])
        prefix = _text(block[345:500].split(b"\0", 1)[0])
        if prefix and kind not in GNU_TYPES:
            name = prefix + "/" + name
        self._skip(BLOCK)
        return name, size, kind


_META_NAMES = {b"L": "GNU long name", b"K": "GNU long link name", b"x": "pax header",
               b"X": "pax header", b"g": "pax global header"}


def _byte_sum(data: bytes) -> int:
    """sum(data) in C: Adler-32's first half is 1 + the byte sum mod 65521, exact for pieces of
    at most 256 bytes (256 * 255 + 1 < 65521). A header's sum was the parser's largest cost."""
    return sum((zlib.adler32(data[i:i + 256]) & 0xFFFF) - 1 for i in range(0, len(data), 256))


def _checksum_ok(block: bytes, stored: int) -> bool:
    """tarfile accepts the unsigned or the signed byte sum, the checksum field counted as spaces."""
    unsigned = 256 + _byte_sum(block) - sum(block[148:156])
    if stored == unsigned:
        return True
    rest = block[:148] + block[156:]
    return stored == unsigned - 256 * sum(1 for b in rest if b > 127)


def _pax_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise TarDamage(f"invalid pax size {value!r}") from None
    if size < 0:
        raise TarDamage(f"negative pax size {value!r}")
    return size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _number(field: bytes) -> int:
    """tarfile's nti: octal text, or base-256 when the first byte is 0x80/0xff."""
    if field[:1] in (b"\x80", b"\xff"):
        n = 0
        for byte in field[1:]:
            n = (n << 8) + byte
        if field[:1] == b"\xff":
            n = -(256 ** (len(field) - 1) - n)
        return n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """'<len> <key>=<value>\\n' records; malformed ones are ignored like unknown keys."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1:pos + length - 1]
        key, eq, value = record.partition(b"=")
        if eq:
            out[key.decode("utf-8", "replace")] = _text(value)
        pos += length
    return out
