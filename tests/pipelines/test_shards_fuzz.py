"""Fuzzing the tar layer and the sample policy (hypothesis): random names, member kinds, sizes,
byte flips and cuts never hang, never raise past the stage, and every member is accounted for.
Bounded to a few seconds; in CI (CI=true) the examples are derandomized so a run is repeatable."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import tarfile

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tok_data as td
from pipelines.samples import REASONS, Rejection, SamplePolicy
from pipelines.shards.reader import TarShardReader
from pipelines.shards.tarstream import BLOCK, TarMembers

# no shrinking: a hang found is reported at once (each shrink step would wait out the guard)
FUZZ = settings(max_examples=120, deadline=None, derandomize=os.environ.get("CI") == "true",
                phases=(Phase.explicit, Phase.reuse, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PNG = td.png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}

# names from a small alphabet so keys repeat and collide: dots, slashes, non-ASCII and one
# undecodable byte (as tarfile's surrogateescape writes it), sometimes longer than 100 bytes
name_part = st.text(alphabet="ab.é/_\udce9", min_size=0, max_size=6)
names = st.builds(lambda a, b, ext, long: ("x" * 120 + "/" if long else "") + a + b + ext,
                  name_part, name_part, st.sampled_from(["", ".png", ".cls", ".PNG", ".txt", ".jpg"]),
                  st.booleans()).filter(lambda n: n and not n.endswith("/"))
members = st.lists(st.tuples(names, st.sampled_from(sorted(KINDS)), st.sampled_from([0, 1, 511, 513, -1])),
                   min_size=0, max_size=12)


def build(spec, fmt) -> tuple[bytes, int]:
    """(tar bytes, members other than directories); size -1 stands for a real PNG."""
    buf = io.BytesIO()
    counted = 0
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, kind, size in spec:
            info = tarfile.TarInfo(name)
            info.type = KINDS[kind]
            data = b""
            if kind == "file":
                data = PNG if size < 0 else bytes(size)
                info.size = len(data)
            elif kind in ("symlink", "hardlink"):
                info.linkname = "target.png"
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
            counted += kind != "dir"
    return buf.getvalue(), counted


@contextlib.contextmanager
def hang_guard(seconds: float = 3.0):
    """Fail (TimeoutError) instead of hanging when the body runs longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s: the reader loops")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_all(data: bytes, url_dir, max_member_bytes: int = 600):
    """Samples and reader after reading `data` as a shard, with a cap on iterations (each
    member consumes at least one 512-byte header, so more samples than blocks is a loop) and
    on time (a loop inside one sample yields nothing)."""
    path = os.path.join(url_dir, "fuzz.tar")
    with open(path, "wb") as f:
        f.write(data)
    policy = SamplePolicy(1, 28, ("cls",), max_member_bytes=max_member_bytes)
    reader = TarShardReader(path, policy.wants, max_member_bytes)
    samples = []
    with hang_guard():
        for sample in reader:
            samples.append(sample)
            assert len(samples) <= len(data) // BLOCK + 1, "the reader yields more samples than blocks"
    return samples, reader, policy


def accounted(samples) -> int:
    return sum(1 if s.stray is not None else
               len(s.fields) + len(s.skipped) + len(s.too_large) + len(s.special) + len(s.repeated)
               for s in samples)


@FUZZ
@given(spec=members, fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_every_member_of_a_valid_tar_is_accounted_for_and_judged(tmp_path_factory, spec, fmt):
    data, counted = build(spec, fmt)
    samples, reader, policy = read_all(data, tmp_path_factory.mktemp("fuzz"))
    assert reader.error is None
    assert accounted(samples) == counted
    keys_ok = []
    for sample in samples:
        judged = policy(sample)                       # never raises
        if isinstance(judged, Rejection):
            assert judged.reason in REASONS
            judged.key.encode("utf-8")                # storable as Parquet text
        else:
            assert judged[0].shape == (1, 28, 28)
            keys_ok.append(sample.key)
    assert len(keys_ok) == len(set(keys_ok))          # one row per key at most


def header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def set_size_field(data: bytearray, offset: int, field: bytes) -> None:
    """Write a raw size field into the header at `offset`, with a checksum that still holds, so
    the parser believes it: negative base-256 sizes, absurd ones, garbage."""
    data[offset + 124:offset + 136] = field
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + BLOCK])


size_fields = st.one_of(st.binary(min_size=12, max_size=12),
                        st.builds(lambda b: b"\xff" + b, st.binary(min_size=11, max_size=11)),   # negative
                        st.builds(lambda n: b"\xff" + (256 ** 11 + n).to_bytes(11, "big"),      # a little
                                  st.one_of(st.integers(-4096, -1),                              # negative,
                                            st.integers(1, 4096).map(lambda k: -BLOCK * k))),    # in blocks
                        st.builds(lambda n: b"%011o\0" % n, st.integers(0, 8 ** 11 - 1)))


@FUZZ
@given(spec=members, flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
       sizes=st.lists(st.tuples(st.integers(0, 64), size_fields), max_size=3))
def test_damaged_tars_never_hang_raise_or_invent_members(tmp_path_factory, spec, flips, cut, sizes):
    data, _ = build(spec, tarfile.GNU_FORMAT)
    damaged = bytearray(data)
    offsets = header_offsets(data)
    for index, field in sizes:
        if offsets:
            set_size_field(damaged, offsets[index % len(offsets)], field)
    for pos, value in flips:
        if damaged:
            damaged[pos % len(damaged)] = value
    if cut is not None:
        damaged = damaged[: cut % (len(damaged) + 1)]
    samples, reader, policy = read_all(bytes(damaged), tmp_path_factory.mktemp("fuzz"))
    for sample in samples:
        judged = policy(sample)
        assert not isinstance(judged, Rejection) or judged.reason in REASONS
    assert reader.bytes_read <= len(damaged)
    if reader.error is None:
        assert all(s.complete for s in samples)


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_arbitrary_bytes_end_as_a_reason(data):
    members = TarMembers(io.BytesIO(data))
    got = []
    for item in members:
        got.append(item)
        assert len(got) <= len(data) // BLOCK + 1
    assert members.end is not None and members.offset <= len(data)
