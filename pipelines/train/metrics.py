"""Rank-0 outputs: metrics as JSON lines and a PNG grid of originals vs reconstructions."""
from __future__ import annotations

import io
import json
import math

import fsspec
import numpy as np
import torch
from PIL import Image

from tokenizer.storage import write_bytes_atomic


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio of images in [0, 1]."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def code_stats(codes: torch.Tensor, k: int) -> tuple[float, float]:
    """(usage fraction, perplexity) of integer codes over a codebook of size k."""
    counts = torch.bincount(codes.reshape(-1), minlength=k).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


class MetricsLog:
    """Append-only JSONL at RUN_DIR/metrics.jsonl (one object per line, flushed each write)."""

    def __init__(self, run_dir: str):
        self.url = run_dir.rstrip("/") + "/metrics.jsonl"
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._f = fsspec.open(self.url, "a").open()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def save_grid(url: str, originals: torch.Tensor, recons: torch.Tensor, per_row: int = 8) -> None:
    """Rows of `per_row` images: originals, their reconstructions below, repeated. Inputs
    (N, C, H, W) in [0, 1]; written as one PNG."""
    n = min(len(originals), len(recons))
    n -= n % per_row if n >= per_row else 0
    per_row = min(per_row, n)
    rows = []
    for start in range(0, n, per_row):
        for batch in (originals, recons):
            rows.append(torch.cat(list(batch[start:start + per_row]), dim=2))   # (C, H, W*per_row)
    grid = torch.cat(rows, dim=1)                                                # (C, H*rows, W*per_row)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_bytes_atomic(url, buf.getvalue())
