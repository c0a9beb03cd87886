"""Prior training throughput fed from Parquet against the same steps fed from memory.

    python -m benchmarks.prior_loader [--codes OUTPUT] [--steps 25] [--rounds 3] [--workers 1] [--threads N]

Builds one prior trainer (pipelines/prior/loop.py, one process, the default config of
configs/prior_cpu.yaml unless --set changes it) and times its train_step on batches from
  - Parquet: the trainer's own loader (CodesDataset -> CodeBatches -> DataLoader with --workers
    worker processes), and
  - memory: every row already in one (N, h, w) tensor, batches taken by random index.
The two alternate (--rounds of each, best of each kept, so a busy machine hurts both alike) and
the ratio of their tokens/s (codes per second) is printed: >= 0.9 means the loader is not the
bottleneck. Without --codes, a synthetic output of 60k rows of 7x7 codes (K = 512, 10 classes)
is written to a temporary directory (benchmarks/codes_dataset.py's writer).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.codes_dataset import write_output
from pipelines import CodesDataset
from pipelines.distributed import DistInfo
from pipelines.prior.config import resolve_prior_config
from pipelines.prior.launch import preflight
from pipelines.prior.loop import PriorTrainer


def in_memory(codes: str, label: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of the output: codes (N, h, w) int64 and labels (N,) (empty when unlabelled)."""
    dataset = CodesDataset(codes, rank=0, world_size=1, fields=(label,) if label else ())
    blocks = list(dataset.blocks())
    grids = torch.from_numpy(np.concatenate([b.codes for b in blocks]))
    labels = torch.tensor([v for b in blocks for v in b.extra[label]]) if label else torch.zeros(0, dtype=torch.long)
    return grids, labels


def timed_steps(trainer: PriorTrainer, batches, steps: int, warmup: int = 3) -> float:
    """Tokens (codes) per second over `steps` train steps after `warmup` untimed ones."""
    for _ in range(warmup):
        trainer.train_step(next(batches))
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    elapsed = time.perf_counter() - t
    return steps * trainer.local_batch * trainer.prior_config.num_codes / elapsed


def memory_batches(grids: torch.Tensor, labels: torch.Tensor, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(grids), (batch,), generator=g)
        yield {"codes": grids[idx], "cls": labels[idx] if len(labels) else labels}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--codes", help="a tokenize output (default: a synthetic one)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (data.num_workers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="a prior config override")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        codes = args.codes
        if not codes:
            codes = f"{root}/codes"
            os.makedirs(codes)
            write_output(codes, 60000, 7, 512)
        cfg = resolve_prior_config(None, [*args.sets, f"data.num_workers={args.workers}", "train.progress=false"],
                                   codes=codes)
        cfg = preflight(cfg, 1)
        trainer = PriorTrainer(cfg, f"{root}/run", DistInfo())
        grids, labels = in_memory(codes, trainer.label)
        parquet = iter(trainer.loader())
        memory = memory_batches(grids, labels, trainer.local_batch)
        rates: dict[str, list[float]] = {"parquet": [], "memory": []}
        for _ in range(args.rounds):
            rates["memory"].append(timed_steps(trainer, memory, args.steps))
            rates["parquet"].append(timed_steps(trainer, parquet, args.steps))
        trainer.log.close()
    c = cfg.model
    print(f"prior d_model {c.d_model}, {c.layers} layers, batch {cfg.data.batch_size} rows of "
          f"{trainer.prior_config.num_codes} codes, K={trainer.prior_config.codebook_size}, "
          f"{torch.get_num_threads()} torch threads, {args.workers} DataLoader worker(s); best of {args.rounds} "
          f"rounds of {args.steps} steps")
    best = {name: max(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"  {name:<8} {best[name]:>10,.0f} tokens/s   (rounds: {', '.join(f'{x:,.0f}' for x in r)})")
    print(f"  parquet / memory = {best['parquet'] / best['memory']:.3f}")


if __name__ == "__main__":
    main()
