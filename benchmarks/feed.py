"""Does a tokenize worker keep its accelerator fed? Delivered images/s over the decode limit.

    python benchmarks/feed.py [--images 60000] [--cpus 1 2] [--batch-ms 0 5] [--passes K] [--workdir DIR]

The worker's own CPU side (`ShardTokenizer`: decode processes, shared-memory batches, encoder
lock, Parquet writes) runs with a stand-in accelerator instead of the model, so that what is
measured is how fast the CPUs can feed it:
- `free`: an encoder that costs nothing (it copies the batch, as a host-to-device copy would);
- `--batch-ms T`: one that also sleeps T ms per batch, releasing the interpreter lock as a GPU
  kernel launch and wait do.
The decode limit of the same CPUs: N plain processes, each reading and decoding whole shards one
after another (TarShardReader + ImagePreprocessor, nothing else), all the images over the wall
time. Both sides run in this one run, over the same Fashion-MNIST PNG shards (`vqtok prepare`).

Through the product: `vqtok tokenize --workers 1 --cpus-per-worker N` (embedded Ray) with a
tokenizer so small that encoding is nearly free, steady state = images / (wall - start-up).

Projection for more CPUs per accelerator: each decode process delivers what one process decodes
(measured) times the efficiency measured at the largest N here, until the worker process itself
is the limit: its CPU seconds per image (receiving batches, the stand-in encode, writing
Parquet; measured) cap it at 1 / that.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root

import argparse
import glob
import multiprocessing
import tempfile
import threading
import time

import numpy as np


from pipelines.output_format import OutputMetadata  # noqa: E402
from pipelines.images import ImagePreprocessor, find_image  # noqa: E402
from pipelines.tokenize.shard_job import ShardTokenizer  # noqa: E402
from pipelines.shards.reader import TarShardReader  # noqa: E402


class StandInEncoder:
    """The CodeEncoder interface with a free (or fixed-time, lock-releasing) accelerator."""
    channels, resolution, grid, codebook_size = 1, 28, (7, 7), 512
    sha256 = "0" * 64
    code_dtype = np.int16
    micro_batch = 256

    def __init__(self, batch_ms: float):
        self.batch_s = batch_ms / 1000.0
        self.device = "stand-in"

    def encode(self, images: np.ndarray) -> np.ndarray:
        staged = np.array(images, copy=True)                     # the host-to-device copy
        if self.batch_s:
            time.sleep(self.batch_s)
        return np.zeros((staged.shape[0], 49), np.int16)


def decode_only(paths: list[str]) -> int:
    pre = ImagePreprocessor(1, 28)
    n = 0
    for path in paths:
        for sample in TarShardReader(path):
            found = find_image(sample.fields)
            pre(found[1], found[0])
            n += 1
    return n


def decode_limit(paths: list[str], procs: int) -> float:
    """Images/s of `procs` plain decode processes, each taking whole shards."""
    parts = [paths[i::procs] for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(len, [[]] * procs)                                 # started and imported
        t0 = time.perf_counter()
        n = sum(pool.map(decode_only, parts))
        return n / (time.perf_counter() - t0)


def delivered(paths: list[str], procs: int, batch_ms: float, out: str) -> tuple[float, float]:
    """(images/s through ShardTokenizer with `procs` decode processes, worker CPU s per image)."""
    enc = StandInEncoder(batch_ms)
    meta = OutputMetadata(tokenizer_sha256=enc.sha256, codebook_size=512, grid=(7, 7), channels=1,
                          resolution=28)
    job = ShardTokenizer(enc, meta, out, ["cls"], batch_size=256, decode_processes=procs)
    todo = list(enumerate(paths))
    lock = threading.Lock()
    count = [0]

    def shard_loop():                       # as the actor's threads: one call per slot (+1 queued)
        while True:
            with lock:
                if not todo:
                    return
                i, path = todo.pop(0)
            manifest = job.run(path, f"s{i:04d}")
            with lock:
                count[0] += manifest["counts"]["ok"]

    try:
        time.sleep(1.0)                     # decode processes started and imported
        threads = [threading.Thread(target=shard_loop) for _ in range(job.slots + 1)]
        c0, t0 = time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        job.close()
    return count[0] / wall, cpu / count[0]


def tiny_tokenizer(path: str) -> None:
    """A 28x28 grey tokenizer whose encoder costs next to nothing."""
    from tokenizer import VQVAE, QuantizerConfig, VQVAEConfig
    cfg = VQVAEConfig(hidden=4, res_hidden=2, outer_hidden=2, num_res_blocks=0, code_dim=4,
                      quantizer=QuantizerConfig(codebook_size=16, kmeans_init=False))
    VQVAE(cfg).save_pretrained(path)


def through_tokenize(pattern: str, tok: str, cpus: int, out: str) -> float:
    """Steady-state images/s of `vqtok tokenize` with one worker of `cpus` CPUs."""
    import json
    import shutil
    import subprocess
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pipelines", "tokenize", "--tokenizer", tok, "--input", pattern,
                           "--output", out, "--workers", "1", "--cpus-per-worker", str(cpus), "--no-progress"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vqtok tokenize failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.split("summary: ")[-1].splitlines()[0])
    return summary["samples"]["ok"] / (summary["wall_s"] - summary["startup_s"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-ms", type=float, nargs="+", default=[0.0, 5.0])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is kept")
    ap.add_argument("--passes", type=int, default=1,
                    help="each measurement goes over the shards this many times (longer, steadier runs)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-tokenize", action="store_true", help="skip the `vqtok tokenize` runs")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="vqtok-feed-")
    shards = os.path.join(work, "shards")
    if not glob.glob(f"{shards}/train-*.tar"):
        from pipelines.prepare.fashion import prepare_fashion_mnist
        prepare_fashion_mnist(shards, shard_size=5000, splits=("train",), limit=args.images, progress=False)
    paths = sorted(glob.glob(f"{shards}/train-*.tar"))
    images = sum(1 for p in paths for _ in TarShardReader(p))
    print(f"{len(paths)} shards, {images} images, {args.passes} pass(es) per measurement; "
          f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    paths = paths * args.passes                 # the stand-in and the limit (not vqtok tokenize)

    tok = os.path.join(work, "tiny-tokenizer")
    if not args.no_tokenize and not os.path.exists(os.path.join(tok, "config.json")):
        tiny_tokenizer(tok)
    best: dict = {}
    per_repeat: dict = {}          # (feed, procs, ms) -> delivered / that repeat's limit
    for rep in range(args.repeats):
        for procs in args.cpus:
            key = ("limit", procs)
            limit_now = decode_limit(paths, procs)          # this repeat's, next to its runs
            best[key] = max(best.get(key, 0.0), limit_now)
            if not args.no_tokenize:
                rate = through_tokenize(f"{shards}/train-*.tar", tok, procs, os.path.join(work, "tok-out"))
                best[("tokenize", procs)] = max(best.get(("tokenize", procs), 0.0), rate)
                print(f"  repeat {rep}: vqtok tokenize --workers 1 --cpus-per-worker {procs}: {rate:,.0f} img/s "
                      f"steady state; load {os.getloadavg()[0]:.2f}", flush=True)
            for ms in args.batch_ms:
                rate, cpu = delivered(paths, procs, ms, os.path.join(work, f"out-{procs}-{ms}"))
                key = ("feed", procs, ms)
                if rate > best.get(key, (0.0, 0.0))[0]:
                    best[key] = (rate, cpu)
                per_repeat.setdefault(key, []).append(rate / limit_now)
                print(f"  repeat {rep}: {procs} CPU, stand-in {ms:g} ms/batch: {rate:,.0f} img/s, this "
                      f"repeat's limit {limit_now:,.0f}: {rate / limit_now:.2f}x; load {os.getloadavg()[0]:.2f}",
                      flush=True)

    print("\nCPUs | stand-in accelerator | delivered img/s | decode limit img/s | ratio (bests) | "
          "each repeat's ratio | worker CPU us/img")
    for procs in args.cpus:
        for ms in args.batch_ms:
            rate, cpu = best[("feed", procs, ms)]
            limit = best[("limit", procs)]
            what = "free" if not ms else f"{ms:g} ms/batch"
            spread = ", ".join(f"{r:.2f}" for r in per_repeat[("feed", procs, ms)])
            print(f"{procs:4d} | {what:20s} | {rate:15,.0f} | {limit:18,.0f} | {rate / limit:5.2f}x | "
                  f"{spread} | {cpu * 1e6:6.1f}")

    if not args.no_tokenize:
        print("\nvqtok tokenize, one worker, tiny tokenizer (steady state):")
        for procs in args.cpus:
            rate, limit = best[("tokenize", procs)], best[("limit", procs)]
            print(f"  --cpus-per-worker {procs}: {rate:,.0f} img/s = {rate / limit:.2f}x the decode limit")

    top = max(args.cpus)
    per_proc = best[("limit", 1)] if ("limit", 1) in best else best[("limit", top)] / top
    rate, cpu = best[("feed", top, 0.0 if 0.0 in args.batch_ms else args.batch_ms[0])]
    efficiency = rate / best[("limit", top)]
    ceiling = 1.0 / cpu
    print(f"\nprojection (per decode process {per_proc:,.0f} img/s x efficiency {efficiency:.2f} at {top} CPUs; "
          f"worker-process ceiling 1 / {cpu * 1e6:.1f} us = {ceiling:,.0f} img/s):")
    for n in (8, 16, 32):
        projected = min(n * per_proc * efficiency, ceiling)
        print(f"  {n:2d} CPUs per accelerator: {projected:,.0f} img/s "
              f"({projected / (n * per_proc):.2f}x the decode limit)")


if __name__ == "__main__":
    main()
