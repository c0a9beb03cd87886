"""Benchmark `vqtok tokenize` against the machine limit and a naive loop, in one run.

    python benchmarks/tokenize_throughput.py [--images 60000] [--per-shard 5000] [--workdir DIR] [--repeat K]

1. shards: the first N Fashion-MNIST train images as PNG WebDataset shards (+ cls);
   tokenizer: the default VQVAEConfig (28x28 grey, hidden 128), codebook k-means-initialised.
2. machine limit: decode core-seconds (one thread) + encode core-seconds (one thread, images
   already in memory), divided by the machine's cores;
3. naive loop: one process, shard by shard: read, decode, encode (torch defaults), write Parquet;
   timed twice: the loop alone (torch already imported), and as a program of its own, launch
   to exit (interpreter, imports and the loop), which is how `vqtok tokenize` is timed;
4. `vqtok tokenize` (subprocess, embedded local Ray), start-up included; steady state from the
   manifests' per-shard wall times.
Prints the figures and the ratios (higher = faster). --repeat K runs naive loop and pipeline
over the same shards K times under new names (the same images; the limit is scaled by K), to
show how the fixed start-up cost amortises on a bigger job.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

FMNIST = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(n: int):
    with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FMNIST}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return images, labels


def make_shards(directory: str, n: int, per_shard: int) -> list[str]:
    images, labels = fashion_mnist(n)
    paths = []
    for s, lo in enumerate(range(0, n, per_shard)):
        path = os.path.join(directory, f"train-{s:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(lo, min(lo + per_shard, n)):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def repeat_shards(paths: list[str], work: str, k: int) -> str:
    """Symlinks naming each shard k times (train-R-XXXXXX.tar); returns their glob pattern."""
    folder = os.path.join(work, f"shards_x{k}")
    os.makedirs(folder, exist_ok=True)
    for r in range(k):
        for path in paths:
            link = os.path.join(folder, f"train-{r}-{os.path.basename(path)[6:]}")
            if not os.path.lexists(link):
                os.symlink(path, link)
    return f"{folder}/train-*.tar"


def make_tokenizer(path: str) -> None:
    from tokenizer import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig())
    images, _ = fashion_mnist(1024)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images[:, None].copy()).float() / 255.0)
    model.eval().save_pretrained(path)


def read_png_bytes(paths: list[str]) -> list[bytes]:
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]
    return out


def machine_limit(paths: list[str], tok: str) -> dict:
    """Core-seconds of decode and encode, each on one thread."""
    from pipelines.tokenize.encoder import CodeEncoder
    from pipelines.images import ImagePreprocessor
    data = read_png_bytes(paths)
    pre = ImagePreprocessor(1, 28)
    c0, w0 = time.thread_time(), time.perf_counter()
    images = np.stack([pre(b) for b in data])
    decode_cpu, decode_wall = time.thread_time() - c0, time.perf_counter() - w0
    threads = torch.get_num_threads()
    enc = CodeEncoder(tok, threads=1)
    enc.encode(images[:64])                            # warm-up
    c0, w0 = time.thread_time(), time.perf_counter()
    enc.encode(images)
    encode_cpu, encode_wall = time.thread_time() - c0, time.perf_counter() - w0
    torch.set_num_threads(threads)
    return {"images": len(data), "decode_cpu_s": decode_cpu, "encode_cpu_s": encode_cpu,
            "decode_wall_s": decode_wall, "encode_wall_s": encode_wall}


def naive_loop(paths: list[str], tok: str, out: str) -> float:
    """Read, decode, encode (torch's default threads), write; one shard after the other."""
    from tokenizer import VQVAE
    from pipelines.images import ImagePreprocessor
    t0 = time.perf_counter()
    model = VQVAE.from_pretrained(tok)
    pre = ImagePreprocessor(1, 28)
    os.makedirs(out, exist_ok=True)
    for path in paths:
        keys, images = [], []
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    keys.append(m.name[:-4])
                    images.append(pre(tar.extractfile(m).read()))
        x = torch.from_numpy(np.stack(images)).float() / 255.0
        codes = torch.cat([model.encode(x[i:i + 256]) for i in range(0, len(x), 256)]).reshape(len(x), -1)
        table = pa.table({"key": keys, "codes": [c.tolist() for c in codes.to(torch.int16).numpy()]})
        pq.write_table(table, os.path.join(out, os.path.basename(path)[:-4] + ".parquet"), compression="zstd")
    return time.perf_counter() - t0


def naive_program(paths: list[str], tok: str, out: str) -> float:
    """The naive loop as a program of its own: launch to exit, its imports included."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--naive-program", json.dumps(paths),
                    "--workdir", os.path.dirname(out), "--tokenizer", tok], check=True)
    return time.perf_counter() - t0


def pipeline(pattern: str, tok: str, out: str, extra: list[str]) -> tuple[float, dict, list[dict]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines", "tokenize", "--tokenizer", tok, "--input", pattern,
                           "--output", out, "--no-progress", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"vqtok tokenize failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.split("summary: ")[-1])
    manifests = [json.load(open(p)) for p in glob.glob(f"{out}/_manifest/*.json")]
    return wall, summary, manifests


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--per-shard", type=int, default=5000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--pipeline-args", default="", help="extra `vqtok tokenize` arguments")
    ap.add_argument("--repeat", type=int, default=1, help="the shards K times (same images, new names)")
    ap.add_argument("--naive-program", default=None, help=argparse.SUPPRESS)   # JSON list of shards
    ap.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_program:
        naive_loop(json.loads(args.naive_program), args.tokenizer, os.path.join(args.workdir, "naive_program_out"))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="vqtok-bench-")
    cores = os.cpu_count() or 1
    print(f"workdir {work}; {cores} cores; load average {load_average()} at start", flush=True)
    shards_dir = os.path.join(work, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    paths = sorted(glob.glob(f"{shards_dir}/train-*.tar")) or make_shards(shards_dir, args.images, args.per_shard)
    tok = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(tok, "config.json")):
        make_tokenizer(tok)

    lim = machine_limit(paths, tok)
    pattern = f"{shards_dir}/train-*.tar"
    if args.repeat > 1:
        pattern = repeat_shards(paths, work, args.repeat)
        paths = sorted(glob.glob(pattern))
        lim = {k: v * args.repeat for k, v in lim.items()}
        print(f"--repeat {args.repeat}: {len(paths)} shards, {lim['images']} samples (the same images "
              f"{args.repeat} times); limit scaled by {args.repeat}", flush=True)
    n = lim["images"]
    limit_s = (lim["decode_cpu_s"] + lim["encode_cpu_s"]) / cores
    print(f"limit: decode {lim['decode_cpu_s']:.1f} core-s + encode {lim['encode_cpu_s']:.1f} core-s over "
          f"{cores} cores = {limit_s:.1f} s ({n / limit_s:.0f} img/s)  [wall of those single-thread runs: "
          f"{lim['decode_wall_s']:.1f} + {lim['encode_wall_s']:.1f} s; load {load_average()}]", flush=True)
    naive_s = naive_loop(paths, tok, os.path.join(work, "naive_out"))
    print(f"naive loop: {naive_s:.1f} s ({n / naive_s:.0f} img/s)  [load {load_average()}]", flush=True)
    program_s = naive_program(paths, tok, os.path.join(work, "naive_program_out"))
    print(f"naive loop as a program (launch to exit): {program_s:.1f} s ({n / program_s:.0f} img/s)  "
          f"[load {load_average()}]", flush=True)
    out = os.path.join(work, "pipeline_out")
    subprocess.run(["rm", "-rf", out])
    wall, summary, manifests = pipeline(pattern, tok, out, args.pipeline_args.split())
    assert summary["samples"]["ok"] == n, summary
    workers = len({m["worker"]["pid"] for m in manifests})
    busy = sum(m["durations_s"]["wall"] for m in manifests) / max(workers, 1)
    working = wall - summary["startup_s"]        # launch to exit less Ray's start to workers ready
    print(f"vqtok tokenize: {wall:.1f} s with start-up ({n / wall:.0f} img/s); Ray start-up to workers ready "
          f"{summary['startup_s']:.1f} s; {workers} workers busy {busy:.1f} s each  [load {load_average()}]")
    print(f"ratios: pipeline/naive program = {program_s / wall:.2f}x (both launch to exit), "
          f"pipeline/naive loop alone = {naive_s / wall:.2f}x, pipeline/limit = {limit_s / wall:.2f}x "
          f"(start-up included); steady state (manifest wall per worker) = {limit_s / busy:.2f}x limit, "
          f"(launch to exit less start-up: {working:.1f} s) = {limit_s / working:.2f}x limit")
    stages = {k: round(v, 1) for k, v in summary["stage_s"].items()}
    print(f"stage seconds summed over shards: {stages}")


if __name__ == "__main__":
    main()
