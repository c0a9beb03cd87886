"""Nearest-codebook search benchmark: tokenizer.nearest_codes (exact) against its arithmetic
limit and the usual alternatives, measured side by side (round-robin repeats, so load from other processes
hits every method alike) and printed as ratios.

    /work/venv/bin/python benchmarks/quantiser.py            # N=65536 K=4096 D=64, ~1-2 min
    /work/venv/bin/python benchmarks/quantiser.py --quick    # smaller, for a smoke run

Needs the `bench` extra (faiss-cpu, vector-quantize-pytorch); a missing one is reported and
skipped. Exit status 1 when a hard target is missed (<= 1.3x the limit, faster than faiss,
>= 5x faster than vector-quantize-pytorch, < 1.5 GiB).
"""
from __future__ import annotations

import os
import sys

# run as a path, the script's folder comes first on sys.path, and benchmarks/ holds scripts named
# like standard modules (tokenize.py): drop it before anything imports the standard library's
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import platform
import resource
import statistics
import subprocess
import threading
import time

import torch

from tokenizer import nearest as nearest_module
from tokenizer.nearest import nearest_codes

LIMIT_ROWS = (512, 1024)  # the arithmetic limit is the fastest of these blockings
GIB = 1 << 30


# ---- the methods: each is a zero-argument callable returning (N,) indices or None -----------
def limit_fn(z, book_t, rows):
    """The same GEMM FLOPs into one preallocated cache-sized block, no argmin."""
    buf = torch.empty(rows, book_t.shape[1])

    def run():
        for r0 in range(0, z.shape[0], rows):
            block = z[r0:r0 + rows]
            torch.mm(block, book_t, out=buf[: block.shape[0]])
    return run


def build_methods(z, book):
    book_t = book.t().contiguous()
    methods = {f"limit (GEMM only, {r}-row blocks)": limit_fn(z, book_t, r) for r in LIMIT_ROWS}
    methods["nearest_codes"] = lambda: nearest_codes(z, book)
    methods["nearest_codes fp32 only (exact=False)"] = lambda: nearest_codes(z, book, exact=False)
    methods["full torch.mm (N x K output)"] = lambda: torch.mm(z, book_t)
    methods["torch.cdist(...).argmin()"] = lambda: torch.cdist(z, book).argmin(1)
    slow = {"torch.cdist(...).argmin()"}
    try:
        import faiss
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(book.shape[1])
        index.add(book.numpy())
        zn = z.numpy()
        methods["faiss IndexFlatL2 k=1"] = lambda: torch.from_numpy(index.search(zn, 1)[1][:, 0])
    except ImportError as exc:
        print(f"skipping faiss: {exc}")
    try:
        from vector_quantize_pytorch import VectorQuantize
        vq = VectorQuantize(dim=book.shape[1], codebook_size=book.shape[0]).eval()
        vq._codebook.embed.copy_(book[None])
        vq._codebook.initted.fill_(True)
        x = z[None]

        def vq_run():
            with torch.no_grad():
                return vq(x)[1][0]
        methods["vector-quantize-pytorch eval fwd"] = vq_run
        slow.add("vector-quantize-pytorch eval fwd")
    except ImportError as exc:
        print(f"skipping vector-quantize-pytorch: {exc}")
    return methods, slow


def round_robin(methods, slow, rounds, slow_rounds, pause=0.05):
    times = {name: [] for name in methods}
    results = {}
    for _ in range(2 if rounds > 1 else 1):   # warm-up: allocator, faiss threads
        for name, fn in methods.items():
            results[name] = fn()
    for r in range(rounds):
        for name, fn in methods.items():
            if name in slow and r >= slow_rounds:
                continue
            time.sleep(pause)   # let other OpenMP pools stop spinning before the next method
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times, results


# ---- peak extra memory in a fresh process -------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(n, k, d):
    torch.manual_seed(0)
    z, book = torch.randn(n, d), torch.randn(k, d)
    nearest_codes(z[:64], book[:64])              # warm the allocator
    base, peak, done = _rss(), [0], threading.Event()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    idx = nearest_codes(z, book)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:                   # a peak between samples still shows here
        peak[0] = max(peak[0], max_after)
    assert idx.shape == (n,)
    print(json.dumps({"extra_bytes": max(peak[0] - base, 0), "seconds": seconds,
                      "full_matrix_bytes": n * k * 4}))


def measure_memory(n, k, d):
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), str(k), str(d)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report -----------------------------------------------------------------------------------
def machine() -> str:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def agreement(z, book, ref, idx):
    """Fraction of rows whose code is as near as the reference's (ties/rounding differ)."""
    if idx is None or idx.shape != ref.shape:
        return float("nan")
    d_ref = (z - book[ref]).pow(2).sum(1)
    d_idx = (z - book[idx.long()]).pow(2).sum(1)
    return float((d_idx <= d_ref + 1e-4 * (1 + d_ref)).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--slow-rounds", type=int, default=3)
    p.add_argument("--mem", default="262144,16384,64", help="N,K,D for the memory check")
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = torch default)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocess")
    p.add_argument("--quick", action="store_true", help="N=8192, K=1024, 3 rounds, small memory run")
    p.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        memory_child(*a.memory_child)
        return 0
    if a.quick:
        a.n, a.k, a.rounds, a.slow_rounds, a.mem = 8192, 1024, 3, 1, "32768,4096,64"

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    z, book = torch.randn(a.n, a.d), torch.randn(a.k, a.d)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"N={a.n} K={a.k} D={a.d}, {a.rounds} interleaved rounds ({a.slow_rounds} for slow methods)")
    methods, slow = build_methods(z, book)
    times, results = round_robin(methods, slow, a.rounds, a.slow_rounds)

    limit = min(min(v) for name, v in times.items() if name.startswith("limit"))
    ref = results["nearest_codes"]
    print(f"\n{'method':40s} {'min s':>8s} {'median s':>9s} {'x limit':>8s} {'as near':>8s}")
    for name, v in times.items():
        agree = agreement(z, book, ref, results[name]) if not name.startswith(("limit", "full")) else None
        print(f"{name:40s} {min(v):8.4f} {statistics.median(v):9.4f} {min(v) / limit:8.2f} "
              f"{'' if agree is None else f'{agree:8.4f}'}")
    ours = min(times["nearest_codes"])
    ok = ours / limit <= 1.3
    print(f"\nnearest_codes (exact) / arithmetic limit = {ours / limit:.2f}x (target <= 1.3)")
    for name in ("faiss IndexFlatL2 k=1", "nearest_codes fp32 only (exact=False)",
                 "vector-quantize-pytorch eval fwd",
                 "torch.cdist(...).argmin()"):
        if name in times:
            print(f"{name} / nearest_codes = {min(times[name]) / ours:.2f}x")
    if "faiss IndexFlatL2 k=1" in times:
        ok &= min(times["faiss IndexFlatL2 k=1"]) > ours
        print("  (target: faiss slower than nearest_codes)")
    print(f"re-decided rows (float64): {100 * nearest_module.ambiguous_fraction(z, book):.4f}%")
    vq = "vector-quantize-pytorch eval fwd"
    if vq in times:
        ok &= min(times[vq]) / ours >= 5.0
        print(f"  (target: vector-quantize-pytorch >= 5x slower)")

    if a.skip_memory:
        print("targets met (memory not measured)" if ok else "TARGET MISSED")
        return 0 if ok else 1
    mn, mk, md = (int(x) for x in a.mem.split(","))
    mem = measure_memory(mn, mk, md)
    print(f"\npeak extra memory at N={mn} K={mk} D={md}: {mem['extra_bytes'] / GIB:.3f} GiB "
          f"(target < 1.5 GiB; the full distance matrix would be {mem['full_matrix_bytes'] / GIB:.1f} GiB), "
          f"{mem['seconds']:.2f} s")
    ok &= mem["extra_bytes"] < 1.5 * GIB
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
