"""CodeEncoder: the tokenizer, loaded once per worker, turning uint8 images into codes.

Determinism: the model always runs on micro-batches of one fixed shape (the last one padded),
TF32 and cuDNN autotuning are off. That alone is not enough: the fp32 GEMM in the nearest-code
search rounds a row differently depending on where it sits in the matrix (blocking tails), so a
near-tie between two codes could flip with the sample's position in the batch. `stable_nearest`
therefore re-decides every row whose best and second-best fp32 scores are within a safe error
bound, exactly in float64 (ties -> lowest index). Every row's code is then the float64 argmin,
whatever the batch, its order, the --batch-size or the worker count.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenizer import VQVAE

# measured with one thread, 28x28 default tokenizer, two processes at once (as two workers):
# 32 images 1702-1751 img/s each, 64: 1733-1754, 128: 1683-1753
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
        self.code_dtype = np.int16 if self.codebook_size <= 32768 else np.int32

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
        q = self.model.quantizer
        z = self.model.encode_latents(x)                      # (m, h, w, D)
        flat = q.search_vectors(z)                            # (m*h*w, d) fp32, as the quantiser
        return stable_nearest(flat, q.search_codebook()).reshape(x.shape[0], -1)


FP32_EPS = 2.0 ** -24


def ambiguity(d: int) -> float:
    """Relative margin under which two fp32 scores may be mis-ordered by rounding: a length-d fp32
    dot product errs by at most ~d * 2**-24 of sum|z_i e_i| <= scale; x4 for safety."""
    return 4.0 * max(d, 1) * FP32_EPS


SCORE_BYTES = 64 << 20   # bound on one (rows, K) fp32 score block
EXACT_BYTES = 64 << 20   # bound on one (rows, K, d) float64 block of the exact re-check


@torch.no_grad()
def stable_nearest(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """z: (N, d) fp32, book: (K, d) -> (N,) int64 argmin of squared L2, independent of the row's
    position: fp32 GEMM for clear winners, float64 exact for near-ties."""
    z, book = z.float(), book.float()
    k, d = book.shape
    book_sq = book.pow(2).sum(1)                                    # (K,)
    book_t = book.t().contiguous()                                  # (d, K)
    idx = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    rows = max(1, SCORE_BYTES // (4 * k))
    for lo in range(0, z.shape[0], rows):
        zc = z[lo:lo + rows]
        scores = torch.addmm(book_sq, zc, book_t, beta=1.0, alpha=-2.0)   # (n, K) = ||e||^2 - 2 z.e
        arg, best, second = best_two(scores)                        # scores[i, arg[i]] is now +inf
        idx[lo:lo + rows] = arg
        if k < 2:
            continue
        margin = ambiguity(d) * (zc.pow(2).sum(1) + book_sq.max())   # (n,) from the terms' magnitude
        unsure = ((second - best) <= margin).nonzero().squeeze(1)
        step = max(1, EXACT_BYTES // (8 * k * d))
        for j in range(0, unsure.numel(), step):
            sel = unsure[j:j + step]
            idx[lo + sel] = exact_among_candidates(zc[sel], book, scores[sel], arg[sel],
                                                   best[sel] + margin[sel])
    return idx


def best_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, K) fp32 -> (argmin (n,) int64, min (n,), second smallest (n,)); the argmin entry of
    each row is overwritten with +inf. First index among equal minima, like torch.min.
    On CPU through numpy: its SIMD argmin/min take ~0.1 ms on a (1568, 512) block where
    torch.min(dim=1) takes ~0.9 ms (measured, one thread; the two torch.min calls were ~9% of
    a worker's encode)."""
    return _best_two_numpy(scores) if scores.device.type == "cpu" else _best_two_torch(scores)


def _best_two_numpy(scores: torch.Tensor):
    s = scores.numpy()                                              # shares memory
    rows = np.arange(s.shape[0])
    arg = s.argmin(axis=1)
    best = s[rows, arg]
    s[rows, arg] = np.inf
    return torch.from_numpy(arg), torch.from_numpy(best), torch.from_numpy(s.min(axis=1))


def _best_two_torch(scores: torch.Tensor):
    best, arg = scores.min(dim=1)
    scores.scatter_(1, arg[:, None], float("inf"))
    return arg, best, scores.min(dim=1).values


def exact_among_candidates(z: torch.Tensor, book: torch.Tensor, scores: torch.Tensor,
                           arg: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Near-tie rows: the float64 argmin over each row's candidates (its fp32 winner `arg` and
    every code scoring <= `limit`; the true nearest is among them, by the margin's error bound),
    ties -> lowest index. z: (s, d), scores: (s, K) with the winners at +inf -> (s,) int64."""
    s = z.shape[0]
    near = scores <= limit[:, None]                                 # (s, K)
    near[torch.arange(s, device=z.device), arg] = True
    r, c = near.nonzero(as_tuple=True)                              # candidate pairs, row-major
    dist = (z.double()[r] - book.double()[c]).pow(2).sum(1)         # (P,) float64
    row_min = torch.full((s,), float("inf"), dtype=torch.float64, device=z.device)
    row_min.scatter_reduce_(0, r, dist, "amin")
    win = dist == row_min[r]
    out = torch.full((s,), book.shape[0], dtype=torch.long, device=z.device)
    return out.scatter_reduce_(0, r[win], c[win], "amin")
