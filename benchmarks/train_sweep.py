"""Many photos32 trainings at once on one GPU machine (not a test): each entry of SWEEP is one
`benchmarks/train_quality.py photos32` run (one rank, fp32, 3000 steps of 128, evaluated on every
held-out set), all entries of a seed side by side, one seed after the other.

  python benchmarks/train_sweep.py --seeds 0 1 [--only k8192_fsq k16384_fsq] [--out DIR]

On a machine without the Debian pictures, unpack benchmarks/bench_assets.py's output first. The
K = 512 baseline also trains the vector-quantize-pytorch reference of its seed (--ref-steps
3000). Prints one table (PSNR and usage per held-out set, gain over the reference) and writes it
with every run's result to OUT/sweep.json; OUT/finals-seed<S>.tar holds the trained tokenizers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# name -> (config, --set overrides)
SIMVQ = ["model.quantizer.ema=false", "model.quantizer.simvq=true"]     # k-means seeds the basis
WIDE_SIMVQ = SIMVQ + ["model.quantizer.codebook_dim=null", "model.quantizer.l2_normalize=false"]


SWEEP = {
    "k512": ("configs/photos32.yaml", []),
    "k512_simvq": ("configs/photos32.yaml", SIMVQ),
    "k8192_vq": ("configs/photos32_k8192.yaml", []),
    "k8192_simvq16": ("configs/photos32_k8192.yaml", SIMVQ),
    "k8192_simvq_wide": ("configs/photos32_k8192.yaml", WIDE_SIMVQ),
    "k8192_simvq_paper": ("configs/photos32_k8192_simvq.yaml", []),
    # the FSQ configs without their decorrelation loss (the sweep of docs/benchmarks.md)
    "k8192_fsq": ("configs/photos32_k8192_fsq.yaml", ["model.quantizer.decorrelation=0"]),
    "k16384_simvq16": ("configs/photos32_k16384.yaml", SIMVQ),
    "k16384_fsq": ("configs/photos32_k16384_fsq.yaml", ["model.quantizer.decorrelation=0"]),
}


def launch(name: str, seed: int, a) -> subprocess.Popen:
    config, sets = SWEEP[name]
    cmd = [sys.executable, f"{HERE}/train_quality.py", "photos32", "--work", a.work, "--tag", name,
           "--config", f"{ROOT}/{config}", "--seed", str(seed), "--steps", str(a.steps), "--nproc", "1",
           "--timing-rounds", "0", "--threads", str(a.threads), "--set", "train.bf16=false",
           "--set", "data.num_workers=1"]    # nine runs share the machine's cores: one worker each
    for s in sets:
        cmd += ["--set", s]
    if name == "k512":
        cmd += ["--ref-steps", "3000", "--fresh-reference"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    log = open(f"{a.work}/sweep-{name}-seed{seed}.out", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def summary(work: str, names: list[str], seeds: list[int]) -> dict:
    out = {}
    for seed in seeds:
        ref_path = f"{work}/photos32-reference-seed{seed}.json"
        ref = json.load(open(ref_path)) if os.path.exists(ref_path) else {}
        for name in names:
            path = f"{work}/photos32-{name}-seed{seed}-result.json"
            if not os.path.exists(path):
                out[f"{name}/seed{seed}"] = None
                continue
            r = json.load(open(path))
            row = {"ms_per_step": r["vqtok"]["ms_per_step"]}
            for held, m in r["vqtok"].items():
                if isinstance(m, dict):
                    row[held] = {k: m[k] for k in ("psnr_of_mean_mse", "usage", "perplexity")}
                    if held in ref:
                        row[held]["gain_db"] = m["psnr_of_mean_mse"] - ref[held]["psnr_of_mean_mse"]
            out[f"{name}/seed{seed}"] = row
        out[f"reference/seed{seed}"] = {h: m for h, m in ref.items() if isinstance(m, dict)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/vqtok-sweep")
    p.add_argument("--out", default=None, help="copy sweep.json and the tokenizers here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--timeout", type=float, default=900, help="seconds a seed's runs may take")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    import train_quality
    t0 = time.perf_counter()
    train_quality.prepare("photos32", a.work)          # once, before the runs share it
    print(f"data prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    for seed in a.seeds:
        t1 = time.perf_counter()
        procs = {name: launch(name, seed, a) for name in a.only}
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, a.timeout - (time.perf_counter() - t1)))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout"
            print(f"seed {seed} {name}: rc {rc} at {time.perf_counter() - t1:.0f} s", flush=True)
        table = summary(a.work, a.only, a.seeds)
        print(json.dumps(table, indent=1), flush=True)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(f"{a.out}/sweep.json", "w") as f:
                json.dump(table, f, indent=1)
            with tarfile.open(f"{a.out}/finals-seed{seed}.tar", "w") as tar:
                for name in a.only:
                    run = f"{a.work}/photos32-{name}"
                    for part in ("final", "metrics.jsonl", "config.yaml"):
                        if os.path.exists(f"{run}/{part}"):
                            tar.add(f"{run}/{part}", arcname=f"{name}-seed{seed}/{part}")
                    if os.path.exists(f"{a.work}/sweep-{name}-seed{seed}.out"):
                        tar.add(f"{a.work}/sweep-{name}-seed{seed}.out", arcname=f"{name}-seed{seed}/log")


if __name__ == "__main__":
    main()
