"""Benchmark resuming `vqtok tokenize`: first run and no-op rerun, local and on an S3 API.

    python -m benchmarks.resume [--shards 500,10000] [--first-run-max 10000] [--workdir DIR]
                                [--no-s3] [--no-local]

For each shard count N:
1. N tiny shards (one 28x28 PNG each) and a tiny untrained tokenizer (grid 7x7, K=16);
2. local: `vqtok tokenize --input 'DIR/train-{000000..N-1}.tar'` timed end to end (a subprocess,
   embedded local Ray), then the same command again with nothing left to do (the no-op rerun);
3. s3: the same against moto in server mode on 127.0.0.1 (a free port; started here, stopped
   by its pid), shards uploaded to s3://bench/in, output s3://bench/outN;
4. planning alone, in this process with a fresh filesystem each time: `list_shards` +
   `OutputDir.finished` (what a rerun does before deciding there is nothing to do), side by side
   with the sequential approach it replaced (an existence check per brace-expanded name, then
   one manifest read after another; reproduced here as `old_planning`). Every planning starts
   with a new filesystem object (its client set up, nothing cached), as a new process does.
First runs above --first-run-max shards are skipped (the rerun then has nothing to measure).
Prints one line per measurement; wall seconds, so run it on a quiet machine or compare ratios.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(directory: str, n: int) -> str:
    """N one-image shards DIR/train-%06d.tar; returns the brace pattern naming all of them."""
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
        with tarfile.open(os.path.join(directory, f"train-{s:06d}.tar"), "w") as tar:
            info = tarfile.TarInfo(f"k{s:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"train-{{000000..{n - 1:06d}}}.tar"


def make_tokenizer(path: str) -> None:
    import torch

    from tokenizer import VQVAE, QuantizerConfig, VQVAEConfig
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=1,
                         code_dim=8, quantizer=QuantizerConfig(codebook_size=16, kmeans_init=False))
    VQVAE(config).eval().save_pretrained(path)


class MotoServer:
    """moto in server mode on 127.0.0.1:<free port>, in its own process group."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REGION": "us-east-1"}
        server = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def tokenize(tok: str, pattern: str, out: str, env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines", "tokenize", "--tokenizer", tok, "--input", pattern,
                           "--output", out, "--no-progress"], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"vqtok tokenize failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("summary: ")][-1]
    return wall, json.loads(line[len("summary: "):])


def fresh_filesystems():
    """Forget cached filesystem instances and listings: every planning starts cold, as a new run does."""
    try:
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass


def new_planning(pattern: str, out: str, sha: str) -> tuple[float, float, int]:
    """(seconds listing the inputs, seconds finding the finished shards, shards found finished)."""
    from pipelines.shards.urls import list_shards
    from pipelines.tokenize.outputs import OutputDir

    fresh_filesystems()
    t0 = time.perf_counter()
    shards = list_shards([pattern])
    t1 = time.perf_counter()
    done = OutputDir(out).finished([s for _, s in shards], sha)
    return t1 - t0, time.perf_counter() - t1, len(done)


def old_planning(pattern: str, out: str, sha: str) -> tuple[float, int]:
    """The approach before the change: a check per brace-expanded name, then sequential reads."""
    import fsspec
    from braceexpand import braceexpand

    from pipelines.shards.urls import _expand_one
    from pipelines.shards.urls import shard_name

    fresh_filesystems()
    t0 = time.perf_counter()
    names = [shard_name(u) for item in braceexpand(pattern) for u in _expand_one(item)]
    fs, root = fsspec.core.url_to_fs(out)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_manifest", detail=False)}
    data = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    done = 0
    for name in names:
        if name + ".json" in present and name + ".parquet" in data:
            done += json.loads(fs.cat_file(f"{root}/_manifest/{name}.json"))["tokenizer_sha256"] == sha
    return time.perf_counter() - t0, done


def measure(where: str, n: int, tok: str, pattern: str, out: str, env: dict, first_run_max: int,
            sha: str) -> None:
    os.environ.update(env)    # planning in this process talks to the same store
    if n > first_run_max:
        print(f"{where:5s} {n:6d} shards  first run skipped (--first-run-max {first_run_max})", flush=True)
        return
    first, summary = tokenize(tok, pattern, out, env)
    assert summary["done"] == n and summary["skipped"] == 0, summary
    print(f"{where:5s} {n:6d} shards  first run {first:7.1f} s", flush=True)
    again, summary = tokenize(tok, pattern, out, env)
    assert summary["skipped"] == n, summary
    runs = [new_planning(pattern, out, sha) for _ in range(3)]
    inputs, finished, done_new = min(runs, key=lambda r: r[0] + r[1])
    old, done_old = old_planning(pattern, out, sha)
    assert done_new == done_old == n, (done_new, done_old)
    new = inputs + finished
    print(f"{where:5s} {n:6d} shards  no-op rerun {again:5.2f} s  "
          f"planning {new:6.3f} s (inputs {inputs:.3f} + finished {finished:.3f}; best of 3)  "
          f"sequential before: {old:6.2f} s ({old / new:5.1f}x)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="500,10000")
    p.add_argument("--first-run-max", type=int, default=10000)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--no-local", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = args.workdir or tempfile.mkdtemp(prefix="vqtok-resume-")
    tok = os.path.join(work, "tok")
    make_tokenizer(tok)
    from pipelines.tokenize.tokenizer_info import tokenizer_metadata
    sha = tokenizer_metadata(tok).tokenizer_sha256
    print(f"cores {os.cpu_count()}, load average {open('/proc/loadavg').read().split()[0]}", flush=True)
    moto = None if args.no_s3 else MotoServer()
    try:
        for n in [int(x) for x in args.shards.split(",")]:
            shard_dir = os.path.join(work, f"in{n}")
            pattern = make_shards(shard_dir, n)
            if not args.no_local:
                measure("local", n, tok, f"{shard_dir}/{pattern}", os.path.join(work, f"out{n}"), {},
                        args.first_run_max, sha)
            if moto is not None:
                import s3fs
                os.environ.update(moto.env)
                fresh_filesystems()
                fs = s3fs.S3FileSystem()
                if not fs.exists("bench"):
                    fs.mkdir("bench")
                fs.put(shard_dir + "/", f"bench/in{n}/", recursive=True)
                measure("s3", n, tok, f"s3://bench/in{n}/{pattern}", f"s3://bench/out{n}", moto.env,
                        args.first_run_max, sha)
            shutil.rmtree(shard_dir, ignore_errors=True)
    finally:
        if moto is not None:
            moto.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
