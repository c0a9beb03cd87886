"""The streaming tar parser against Python's tarfile on every header flavour it must read."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from pipelines.shards.tarstream import END_MARKER, SPECIAL, TarMembers

LONG = "d/" + "x" * 150 + "/sample-0001.png"      # > 100 chars: ustar prefix, GNU 'L' or pax path


def make_tar(fmt: int, members: list[tuple[str, bytes]], extra_dirs: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra_dirs:
            d = tarfile.TarInfo("d")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("d/link.png")
            link.type = tarfile.SYMTYPE
            link.linkname = "a.png"
            tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tarfile_files(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def parse(data: bytes, special: bool = False) -> tuple[list[tuple[str, bytes]], TarMembers]:
    """The members read; links and the like (SPECIAL) only when `special`."""
    members = TarMembers(io.BytesIO(data))
    return [(n, d) for n, d in members if special or d is not SPECIAL], members


MEMBERS = [("s0.png", b"\x89PNG" * 100), ("s0.cls", b"3"), (LONG, bytes(range(256)) * 7),
           ("s1.json", "{\"caption\": \"caf\u00e9\"}".encode()), ("empty.txt", b""),
           ("\u00fcnicode/\u00e9t\u00e9.png", b"x" * 513)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile_for_every_format(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if m[0] != LONG] + [
        ("p" * 90 + "/" + "q" * 60 + ".png", b"prefix")]           # ustar prefix field
    data = make_tar(fmt, members)
    got, reader = parse(data)
    assert got == tarfile_files(data)
    assert [n for n, _ in got] == [n for n, _ in members]
    assert reader.end == END_MARKER
    everything, _ = parse(data, special=True)       # the symlink is reported, not dropped
    assert everything[0] == ("d/link.png", SPECIAL) and everything[1:] == got


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_shards_and_their_truncation(compress):
    data = make_tar(tarfile.PAX_FORMAT, MEMBERS)
    packed = compress(data)
    got, reader = parse(packed)
    assert got == tarfile_files(data) and reader.end == END_MARKER
    got, reader = parse(packed[: len(packed) // 2])
    assert reader.end != END_MARKER
    whole = [(n, d) for n, d in got if d is not None]
    assert whole == tarfile_files(data)[: len(whole)]             # a clean head, nothing invented
    assert all(d is not None for _, d in got[:-1])


def test_large_member_across_read_blocks():
    big = bytes(range(251)) * 40000                               # ~10 MB: spans several reads
    data = make_tar(tarfile.GNU_FORMAT, [("big.bin", big), ("after.txt", b"ok")], extra_dirs=False)
    got, reader = parse(data)
    assert got == [("big.bin", big), ("after.txt", b"ok")] and reader.end == END_MARKER


def test_damage_is_reported_not_raised():
    data = make_tar(tarfile.GNU_FORMAT, MEMBERS, extra_dirs=False)
    got, reader = parse(data[:700])                              # inside the first member's data
    assert got == [("s0.png", None)] and reader.end.startswith("unexpected end of data in member 's0.png'")
    got, reader = parse(data[:300])
    assert got == [] and reader.end == "truncated member header"
    garbage = bytearray(data)
    garbage[2048 + 10] ^= 0xFF                                   # third header (after 2 x 1024 bytes)
    got, reader = parse(bytes(garbage))
    assert [n for n, _ in got] == ["s0.png", "s0.cls"] and reader.end == "bad checksum"
    got, reader = parse(b"")
    assert got == [] and reader.end == "empty file"
    got, reader = parse(b"\0" * 10240)
    assert got == [] and reader.end == END_MARKER


def test_block_prefetcher_hands_out_the_file_in_order_then_the_storage_error():
    import threading
    from pipelines.shards.tarstream import READ_SIZE, BlockPrefetcher

    data = bytes(range(256)) * (READ_SIZE // 256 * 3 + 5)          # 3 full blocks and a tail

    class FailsAfter(io.BytesIO):
        def read(self, n=-1):
            if self.tell() >= len(data):
                raise ConnectionResetError("connection reset by peer")
            return super().read(n)

    blocks = BlockPrefetcher(lambda: io.BytesIO(data))
    got = []
    while block := blocks.read():
        got.append(block)
    assert b"".join(got) == data and len(got) == 4 and blocks.read() == b""
    blocks.close()

    failing = BlockPrefetcher(lambda: FailsAfter(data))
    assert b"".join(failing.read() for _ in range(4)) == data        # what came before the error
    with pytest.raises(ConnectionResetError):
        failing.read()
    failing.close()

    before = threading.active_count()
    abandoned = BlockPrefetcher(lambda: io.BytesIO(data))
    abandoned.read()                               # the thread is blocked on a full queue now
    abandoned.close()
    assert not abandoned.thread.is_alive() and threading.active_count() == before


def test_a_reader_left_early_stops_its_prefetch_thread(tmp_path):
    import threading
    from pipelines.shards.reader import TarShardReader

    members = [(f"s{i:05d}.png", bytes(4096)) for i in range(3000)]       # > 2 blocks ahead
    (tmp_path / "a.tar").write_bytes(make_tar(tarfile.GNU_FORMAT, members, extra_dirs=False))
    before = threading.active_count()
    samples = iter(TarShardReader(str(tmp_path / "a.tar")))
    assert next(samples).key == "s00000"
    assert threading.active_count() == before + 1
    samples.close()
    assert threading.active_count() == before


def header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a raw 12-byte size field and a valid checksum."""
    info = tarfile.TarInfo(name)
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = size_field
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_a_negative_size_is_damage_after_the_readable_head_never_a_loop():
    good = make_tar(tarfile.USTAR_FORMAT, [("a.png", b"A" * 600)], extra_dirs=False)
    head = good[: 512 + 1024]                                   # the member, no end marker
    for field in (b"\xff" * 12, b"\xff" + b"\xff" * 10 + b"\xfe"):      # -1, -2 in base-256
        data = head + header("b.png", field) + b"B" * 1024 + b"\0" * 1024
        got, reader = parse(data)
        assert got == [("a.png", b"A" * 600)]
        assert reader.end.startswith("negative size field") and reader.offset == len(head)
    record = b"11 size=-1\n"                                     # a pax size record of -1
    pax = header("pax", b"%011o\0" % len(record), kind=b"x") + record.ljust(512, b"\0")
    got, reader = parse(head + pax + header("c.png", b"%011o\0" % 1) + b"C".ljust(512, b"\0") + bytes(1024))
    assert got == [("a.png", b"A" * 600)] and reader.end == "negative pax size '-1'"


def test_metadata_members_are_bounded_and_special_members_never_held():
    long_name = header("././@LongLink", b"%011o\0" % (2 << 30), kind=b"L")   # claims a 2 GiB name
    got, reader = parse(long_name + b"x" * 4096)
    assert got == [] and reader.end == "GNU long name of 2147483648 bytes (limit 1048576)"
    odd = header("k.png", b"%011o\0" % (8 << 20), kind=b"Z") + bytes(8 << 20) + b"\0" * 1024
    members = TarMembers(io.BytesIO(odd))
    assert list(members) == [("k.png", SPECIAL)] and members.last_kind == "member of unknown type b'Z'"
    assert members.end == END_MARKER and len(members._buf) <= 2 * (4 << 20)   # streamed past
