"""GPU check: train with NCCL + bf16, tokenize 60k images on accelerator workers, compare with CPU.

    python benchmarks/gpu_check.py [--workdir DIR] [--steps 300] [--cpu-images 10000]

Needs a machine with CUDA (exits 2 without). Steps, each a real `vqtok` command:
1. `vqtok prepare fashion-mnist` (60k train images in 12 shards);
2. `vqtok train` on every GPU (torchrun + DDP, NCCL, bf16 autocast) for --steps steps;
3. `vqtok tokenize` of the 60k images with accelerator workers (one per GPU, the node's CPU share
   each), then again on the CPU only (CUDA hidden) for the first --cpu-images images' shards;
4. prints: images/s (launch to exit and steady state), the accelerator-busy fraction from the
   manifests' stage timings (encode seconds over shard wall seconds, per worker), the decode
   processes' share, and the share of code positions equal to the CPU run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq


def vqtok(*args: str, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], env=env, text=True,
                          stdout=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"vqtok {args[0]} failed (exit {proc.returncode})")
    return time.perf_counter() - t0, proc.stdout


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.split("summary: ")[-1].splitlines()[0])


def manifests(out: str) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(f"{out}/_manifest/*.json"))]


def codes_by_key(out: str, shards: set[str] | None = None) -> dict:
    rows = {}
    for path in sorted(glob.glob(f"{out}/*.parquet")):
        name = os.path.basename(path)[:-8]
        if shards is None or name in shards:
            t = pq.read_table(path, columns=["key", "codes"])
            rows.update(zip(t.column("key").to_pylist(), t.column("codes").to_pylist()))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="gpu_check_out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cpu-images", type=int, default=10000)
    ap.add_argument("--smoke-on-cpu", action="store_true",
                    help="run the same steps on the CPU (checks this script, measures nothing)")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available() and not args.smoke_on_cpu:
        print("gpu_check: no CUDA device; nothing to check", file=sys.stderr)
        raise SystemExit(2)
    gpus = max(1, torch.cuda.device_count())
    work = args.workdir
    data, run = f"{work}/data", f"{work}/run"
    print(f"{gpus} x {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (smoke)'}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    shutil.rmtree(run, ignore_errors=True)       # a check trains from scratch every time
    if not glob.glob(f"{data}/train-*.tar"):
        vqtok("prepare", "fashion-mnist", "--out", data)
    s, _ = vqtok("train", "--config", "configs/fashion_mnist.yaml", "--train-data", f"{data}/train-*.tar",
                 "--val-data", f"{data}/test-*.tar", "--out", run, "--nproc-per-node", str(gpus),
                 "--max-steps", str(args.steps))
    last = [json.loads(line) for line in open(f"{run}/metrics.jsonl")][-1]
    print(f"train: {args.steps} steps on {gpus} GPU(s), NCCL + bf16: {s:.1f} s launch to exit; last metrics "
          f"{ {k: last[k] for k in sorted(last) if k in ('step', 'psnr_of_mean_mse', 'mean_psnr', 'usage', 'images_per_s')} }", flush=True)

    gpu_out = f"{work}/codes_gpu"
    wall, stdout = vqtok("tokenize", "--tokenizer", f"{run}/final", "--input", f"{data}/train-*.tar",
                         "--output", gpu_out, "--overwrite", "--no-progress")
    summ = summary_of(stdout)
    ms = manifests(gpu_out)
    ok = summ["samples"]["ok"]
    working = max(summ["wall_s"] - summ["startup_s"], 1e-9)       # workers ready -> last commit
    print(f"tokenize on GPU: {ok} images, {wall:.1f} s launch to exit = {ok / wall:,.0f} img/s; "
          f"{ok / working:,.0f} img/s once the workers were ready ({summ['startup_s']:.1f} s start-up)", flush=True)
    for pid in sorted({m["worker"]["pid"] for m in ms}):
        mine = [m for m in ms if m["worker"]["pid"] == pid]
        encode = sum(m["durations_s"]["encode"] for m in mine)
        decode = sum(m["durations_s"]["decode"] for m in mine)
        procs = mine[0]["worker"].get("decode_processes", 0)
        print(f"  worker {pid} ({mine[0]['worker']['device']}, {procs} decode processes): "
              f"{sum(m['counts']['ok'] for m in mine)} images; accelerator busy {encode / working:.0%} "
              f"(encode {encode:.1f} s of {working:.1f} s); decode CPU {decode:.1f} s "
              f"= {decode / working / max(procs, 1):.0%} of its decode processes", flush=True)

    shard_names = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{data}/train-*.tar"))
    per_shard = max(1, ms[0]["counts"]["ok"]) if ms else 5000
    pick = shard_names[:max(1, -(-args.cpu_images // per_shard))]
    cpu_out = f"{work}/codes_cpu"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    inputs = [x for name in pick for x in ("--input", f"{data}/{name}.tar")]
    vqtok("tokenize", "--tokenizer", f"{run}/final", *inputs, "--output", cpu_out, "--overwrite",
          "--no-progress", env=env)
    gpu_codes, cpu_codes = codes_by_key(gpu_out, set(pick)), codes_by_key(cpu_out)
    same = total = 0
    for key, codes in cpu_codes.items():
        other = gpu_codes[key]
        same += sum(a == b for a, b in zip(codes, other))
        total += len(codes)
    print(f"codes equal to the CPU run: {same}/{total} positions = {same / max(total, 1):.4%} "
          f"({len(cpu_codes)} images)")


if __name__ == "__main__":
    main()
