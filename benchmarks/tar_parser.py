"""Can the stdlib `tarfile` stream mode replace vqtok's own tar parser (pipelines/shards/tarstream.py)?

Times both over the same in-memory shards, side by side in one run (best of --repeats):
- vqtok: `TarMembers`, which also reports how the stream ended (marker, truncation, damage);
- tarfile: `tarfile.open(mode="r|*")` iterating members and reading each regular file, the way
  a wrapper would have to (it must also catch tarfile's errors to tell damage from the end).
Shards: Fashion-MNIST-sized members (~300 B PNG + 1 B label: the per-member cost dominates)
and photo-sized members (~60 KB: the copying dominates). Also prints how each reads the hostile
cases (a shard cut at a block boundary, a negative base-256 size).

    python benchmarks/tar_parser.py [--members 20000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipelines.shards.tarstream import TarMembers  # noqa: E402


def shard(members: int, size: int) -> bytes:
    buf = io.BytesIO()
    payload = os.urandom(size)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(members):
            for ext, data in (("png", payload), ("cls", b"3")):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_vqtok(data: bytes) -> tuple[int, str]:
    members = TarMembers(io.BytesIO(data))
    n = sum(1 for _ in members)
    return n, members.end


def read_tarfile(data: bytes) -> tuple[int, str]:
    n = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    tar.extractfile(info).read()
                    n += 1
    except (tarfile.TarError, OSError, ValueError) as e:
        return n, f"raised {type(e).__name__}: {e}"
    return n, "ended without an error"


def best(fn, data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn(data)
        times.append(time.process_time() - t0)
    return min(times)


def negative_size_case() -> bytes:
    good = shard(2, 300)
    block = bytearray(good[1024:1536])                      # the second member's header
    block[124:136] = b"\xff" * 11 + b"\x00"                 # base-256: -256
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return good[:1024] + bytes(block) + good[1536:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'shard':<28}{'vqtok us/member':>16}{'tarfile us/member':>19}{'tarfile / vqtok':>17}")
    for label, n, size in (("Fashion-MNIST-sized (300 B)", args.members, 300),
                           ("photo-sized (60 KB)", args.members // 10, 60_000)):
        data = shard(n, size)
        count = 2 * n
        ours = best(read_vqtok, data, args.repeats) / count * 1e6
        theirs = best(read_tarfile, data, args.repeats) / count * 1e6
        print(f"{label:<28}{ours:>16.2f}{theirs:>19.2f}{theirs / ours:>16.2f}x")
    whole = shard(4, 300)
    cut = whole[: 8 * 1024]                 # after the 8 members' blocks: no end-of-archive marker
    for label, data in (("cut at a block boundary", cut), ("negative size field", negative_size_case())):
        (n_ours, end_ours), (n_theirs, end_theirs) = read_vqtok(data), read_tarfile(data)
        print(f"{label}: vqtok {n_ours} members, end {end_ours!r}; "
              f"tarfile {n_theirs} members, {end_theirs}")


if __name__ == "__main__":
    main()
