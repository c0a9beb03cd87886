"""CodeEncoder: the tokenizer, loaded once per worker, turning uint8 images into codes.

Determinism: the model always runs on micro-batches of one fixed shape (the last one padded),
TF32 and cuDNN autotuning are off. That alone is not enough: the fp32 GEMM in the nearest-code
search rounds a row differently depending on where it sits in the matrix (blocking tails), so a
near-tie between two codes could flip with the sample's position in the batch. The codes come
from `VQVAE.encode`, whose search (tokenizer/nearest.py) re-decides every row whose best and
second-best fp32 scores are within a safe error bound, exactly in float64 (ties -> lowest
index). Every row's code is then the float64 argmin, whatever the batch, its order, the
--batch-size or the worker count, and equal to what a user's own loop over `VQVAE.encode` gets.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenizer import VQVAE

from ..output_format import codes_numpy_dtype

# images per model call: the fastest of 32/64/128 on CPU (docs/design.md)
CPU_MICRO_BATCH = 64
GPU_MICRO_BATCH = 512


class CodeEncoder:
    def __init__(self, tokenizer_url: str, device: str | None = None, threads: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(max(1, int(threads)))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model = VQVAE.from_pretrained(tokenizer_url, map_location="cpu")
        self.sha256 = model.weights_sha256()
        self.model = model.to(self.device).eval()
        self.codebook_size = model.codebook_size
        self.grid = tuple(model.grid)
        self.channels = model.config.in_channels
        self.resolution = model.config.resolution
        self.micro_batch = GPU_MICRO_BATCH if self.device.type == "cuda" else CPU_MICRO_BATCH
        self.code_dtype = codes_numpy_dtype(self.codebook_size)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, C, R, R) uint8 -> (N, h*w) int16/int32 codes, row-major over the grid."""
        n = images.shape[0]
        out = np.empty((n, self.grid[0] * self.grid[1]), dtype=self.code_dtype)
        m = self.micro_batch
        for start in range(0, n, m):
            chunk = images[start:start + m]
            k = chunk.shape[0]
            if k < m:   # pad to the fixed shape; padded rows are dropped below
                pad = np.zeros((m - k, *chunk.shape[1:]), dtype=np.uint8)
                chunk = np.concatenate([chunk, pad])
            x = torch.from_numpy(chunk).to(self.device, non_blocking=True).float().div_(255.0)
            codes = self._codes(x)                            # (m, h*w) int64
            out[start:start + k] = codes[:k].cpu().numpy()
        return out

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).reshape(x.shape[0], -1)   # (m, h*w) int64
