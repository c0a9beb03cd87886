"""A class-conditional autoregressive prior over vqtok codes: the proof that the Parquet feeds
prior training.

A tiny causal transformer reads the h x w codes of an image in raster order, conditioned on the
class passed through by `vqtok tokenize --keep-fields cls`, and learns p(code_t | class, codes_<t).
It trains from `pipelines.CodesDataset` in a torch DataLoader, then samples codes per class and
decodes them with the tokenizer into one PNG grid (a row per class).

    python examples/train_prior.py --codes runs/demo/codes --tokenizer runs/demo/tokenizer \
        --out runs/demo/prior --minutes 3

Runs with torchrun too (CodesDataset splits the rows by RANK / WORLD_SIZE); this example keeps
one process and does not all-reduce gradients.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pipelines import CodesDataset
from tokenizer import CheckpointError, ConfigError
from pipelines.decode import load_tokenizer_for
from pipelines.errors import UserError
from pipelines.pictures import image_grid, png_bytes
from tokenizer.storage import write_bytes_atomic


@dataclass
class PriorConfig:
    codebook_size: int
    num_codes: int            # h * w, the sequence length
    num_classes: int
    d_model: int = 64
    layers: int = 3
    heads: int = 4
    dropout: float = 0.1


class Prior(nn.Module):
    """Decoder-only transformer; position 0 holds the class embedding (the start token)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.codebook_size, cfg.d_model)
        self.cls = nn.Embedding(cfg.num_classes, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.num_codes, cfg.d_model))
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.codebook_size)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, codes: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """codes (B, T') with T' <= num_codes - 1 (the prefix), cls (B,) -> logits (B, T'+1, K)."""
        x = torch.cat([self.cls(cls)[:, None], self.tok(codes)], dim=1)          # (B, T'+1, D)
        x = x + self.pos[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))

    def loss(self, codes: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> mean cross-entropy (nats per code) of the raster-order sequence."""
        seq = codes.flatten(1)                                                    # (B, T)
        logits = self(seq[:, :-1], cls)                                           # (B, T, K)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq.reshape(-1))

    @torch.no_grad()
    def sample(self, cls: torch.Tensor, temperature: float = 1.0, generator=None) -> torch.Tensor:
        """cls (B,) -> codes (B, T), one position at a time."""
        seq = torch.zeros(len(cls), 0, dtype=torch.long, device=cls.device)
        for _ in range(self.cfg.num_codes):
            logits = self(seq, cls)[:, -1].float() / max(temperature, 1e-5)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)   # (B, 1)
            seq = torch.cat([seq, nxt], dim=1)
        return seq


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--codes", required=True, help="`vqtok tokenize` output (kept field: cls)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the codes were made with")
    p.add_argument("--out", default="prior_out", help="directory for samples.png, prior.pt, log")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps at most")
    p.add_argument("--minutes", type=float, default=4.0, help="stop training after this long")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--num-classes", type=int, default=0, help="0 = 1 + the largest cls in the codes")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = the cores left after the DataLoader workers (an "
                        "oversubscribed CPU trains several times slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


class Epochs(IterableDataset):
    """Endless passes over a CodesDataset, each with its own shuffle order (set_epoch runs in the
    worker, identically on every rank), so one DataLoader and its workers live for the whole run."""

    def __init__(self, dataset: CodesDataset):
        self.dataset = dataset

    def __iter__(self):
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            yield from self.dataset
            epoch += 1


def batches(dataset: CodesDataset, args):
    """Endless (codes (B, h, w), cls (B,)) batches."""
    loader = DataLoader(Epochs(dataset), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=args.device.startswith("cuda"))
    for batch in loader:
        cls = batch["cls"]
        if not torch.is_tensor(cls) or cls.dtype not in (torch.int64, torch.int32):
            raise UserError(f"{args.codes}: column 'cls' must hold integer class ids")
        if int(cls.min()) < 0 or int(cls.max()) >= args.num_classes:
            raise UserError(f"{args.codes}: class id {int(cls.max())} outside "
                            f"[0, --num-classes {args.num_classes})")
        yield batch["codes"], cls.long()


def count_classes(dataset: CodesDataset, url: str) -> int:
    """1 + the largest class id in the `cls` column (only that column is read)."""
    top = -1
    for path in sorted({g.path for g in dataset.row_groups}):
        with dataset.fs.open(path, "rb") as f:
            column = pq.read_table(f, columns=["cls"]).column("cls")
        if not pa.types.is_integer(column.type):
            raise UserError(f"{path}: column 'cls' must hold integer class ids, found {column.type}")
        if column.null_count:
            raise UserError(f"{path}: {column.null_count} rows have no cls")
        top = max(top, pc.max(column).as_py())
    if top < 0:
        raise UserError(f"{url}: no class ids (negative or no rows)")
    return top + 1


def train(prior: Prior, dataset: CodesDataset, args, log) -> list[float]:
    opt = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.monotonic()
    deadline, losses, window = t0 + 60 * args.minutes, [], []
    prior.train()
    for step, (codes, cls) in enumerate(batches(dataset, args), start=1):
        loss = prior.loss(codes.to(args.device), cls.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step == 1:
            log(f"step 1: loss {window[0]:.3f} nats/code (first batch after {time.monotonic() - t0:.1f}s)")
        if step % args.log_every == 0 or step == args.steps or time.monotonic() > deadline:
            mean = sum(window) / len(window)
            losses.append(mean)
            log(f"step {step}: loss {mean:.3f} nats/code ({mean / math.log(2):.3f} bits)")
            window = []
        if step >= args.steps or time.monotonic() > deadline:
            break
    return losses


def sample_grid(prior: Prior, tokenizer, args, grid: tuple[int, int]) -> tuple[torch.Tensor, list[list]]:
    """Codes (classes * n, h, w) sampled per class, and their decoded images (C, H, W) as rows,
    one row per class."""
    prior.eval()
    n = args.samples_per_class
    cls = torch.arange(args.num_classes, device=args.device).repeat_interleave(n)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    codes = prior.sample(cls, args.temperature, generator=g).reshape(-1, *grid)   # (N, h, w)
    images = tokenizer.decode(codes).cpu()                                        # (N, C, H, W)
    return codes, [list(images[c * n:(c + 1) * n]) for c in range(args.num_classes)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "train.log"), "w")

    def log(msg):
        print(msg, flush=True)
        print(msg, file=log_file, flush=True)

    dataset = CodesDataset(args.codes, shuffle=True, seed=args.seed, fields=("cls",))
    tokenizer = load_tokenizer_for(args.tokenizer, dataset.metadata, args.codes, args.device)
    h, w = dataset.grid
    args.num_classes = args.num_classes or count_classes(dataset, args.codes)
    cfg = PriorConfig(dataset.codebook_size, h * w, args.num_classes, args.d_model, args.layers,
                      args.heads, args.dropout)
    prior = Prior(cfg).to(args.device)
    log(f"{len(dataset)} rows of {h}x{w} codes (K={cfg.codebook_size}); prior with "
        f"{sum(p.numel() for p in prior.parameters()):,} parameters")
    losses = train(prior, dataset, args, log)
    codes, rows = sample_grid(prior, tokenizer, args, (h, w))
    samples = os.path.join(args.out, "samples.png")
    write_bytes_atomic(samples, png_bytes(image_grid(rows)))
    torch.save({"config": asdict(cfg), "state_dict": prior.state_dict()}, os.path.join(args.out, "prior.pt"))
    result = {"losses": losses, "samples_png": samples, "codes": codes.cpu(),
              "prior": os.path.join(args.out, "prior.pt")}
    log(json.dumps({"final_loss": losses[-1], "samples": samples}))
    log_file.close()
    return result


if __name__ == "__main__":
    try:
        main()
    except (UserError, CheckpointError, ConfigError) as e:
        sys.exit(f"Error: {e}")
