"""Rank-0 outputs: metrics as JSON lines and a PNG grid of originals vs reconstructions.
The metrics themselves are defined in pipelines/metrics.py, the pictures in pipelines/pictures.py."""
from __future__ import annotations

import json

import fsspec
import torch

from tokenizer.storage import write_bytes_atomic

from ..metrics import code_counts, codebook_usage, mean_psnr, per_image_mse, perplexity
from ..pictures import comparison_grid, png_bytes


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


def validation_record(x: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor, k: int) -> dict:
    """The `val` record's metrics of originals and reconstructions (N, C, H, W) in [0, 1] and
    their codes (N, h, w): exactly what `vqtok eval` reports for the same images."""
    mse = per_image_mse(x, recon)                                 # (N,)
    counts = code_counts(codes, k)
    return {"mse": float(mse.mean()), "mean_psnr": mean_psnr(mse), "usage": codebook_usage(counts),
            "perplexity": perplexity(counts), "samples": len(x)}


def save_grid(url: str, originals: torch.Tensor, recons: torch.Tensor, per_row: int = 8) -> None:
    """Bands of `per_row` originals above their reconstructions; inputs (N, C, H, W) in [0, 1];
    one PNG, published atomically."""
    write_bytes_atomic(url, png_bytes(comparison_grid(list(originals), list(recons), per_row)))
