"""The one nearest-codebook search: exact, and independent of the batch.

`nearest_codes(z, codebook)` returns, for each row of z, the index of the nearest code by squared
L2, EQUAL to the float64 argmin of sum((z - e)^2) over the same fp32 inputs, lowest index among
equal minima, whatever the batch size, the row's position in it, the thread count or the device.
The quantiser (search and training forward), `VQVAE.encode` and the tokenize stage all use it.

How: argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): one fp32 addmm per row block (the
norms folded in) ranks the codes (||z||^2 is constant per row), and each row keeps its fp32
winner, its score and the second-best score. Every fp32 score is within E of its exact value
(`error_margin`), so a row whose best and second-best scores are more than 2E apart has a certain
winner, the same one however the GEMM was blocked; only the other rows ("ambiguous": near-ties)
are re-decided in float64, among the codes scoring within 2E of their best (`_redecide`). Memory
is O(rows x K), never O(N x K).
"""
from __future__ import annotations

import numpy as np
import torch

_CACHE_BYTES = 4 << 20      # on CPU: target size of one score block (the fastest measured)
_EXACT_BYTES = 64 << 20     # bound on one float64 candidate block of the re-decision

FP32_EPS = 2.0 ** -24       # unit roundoff of fp32


def auto_chunk_rows(num_codes: int, device: torch.device) -> int:
    if device.type == "cpu":
        rows = _CACHE_BYTES // (4 * max(num_codes, 1))
        return int(max(16, min(rows, 4096)))
    # accelerators: bound the block at ~256 MiB
    return int(max(256, min((256 << 20) // (4 * max(num_codes, 1)), 65536)))


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = 0, *,
                  exact: bool = True) -> torch.Tensor:
    """z: (N, D), codebook: (K, D) -> (N,) int64 index of the nearest code (squared L2).

    exact=True: the float64 argmin (ties -> lowest index), independent of batch and position.
    exact=False: the fp32 argmin alone (near-ties may go either way, depending on blocking).
    chunk_rows: rows per score block (0 = automatic).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_codes: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} "
                         "must be (N, D) and (K, D)")
    if codebook.shape[0] == 0:
        raise ValueError("nearest_codes: the codebook is empty (K = 0)")
    if chunk_rows < 0:
        raise ValueError(f"nearest_codes: chunk_rows = {chunk_rows} must be >= 0 (0 = automatic)")
    z = z.float().contiguous()
    codebook = codebook.to(device=z.device, dtype=torch.float32).contiguous()
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        idx, _ = _search(z, codebook, chunk_rows, exact)
    return idx


def _search(z: torch.Tensor, book: torch.Tensor, chunk_rows: int, exact: bool):
    """-> (idx (N,) int64, number of rows re-decided in float64)."""
    exact = exact and book.shape[0] > 1
    book_sq = book.pow(2).sum(1)                                         # (K,)
    idx, unsure = _fp32_pass(z, book, book_sq, chunk_rows, exact)
    if not exact:
        return idx, 0
    return idx, _redecide(z, book, book_sq, idx, unsure)


# ---- exactness: the error bound and the float64 re-decision --------------------------------------
def error_margin(d: int, unit: float = FP32_EPS) -> float:
    """2E / (||z||^2 + max_k ||e_k||^2), E bounding the error of one computed score
    s_k = fl(fl(||e_k||^2) + fl(-2 z.e_k)) in floating point of unit roundoff `unit`:
    fl(||e||^2) errs by <= g_d ||e||^2 (g_d = d u / (1 - d u), any summation order, so also a
    BLAS's blocked sums and FMA); -2 is a power of two, so fl(-2 z.e) = -2 fl(z.e) (addmm's alpha=-2
    changes nothing) and errs by <= 2 g_d sum|z_i e_i| <= g_d (||z||^2 + ||e||^2); the
    bias add rounds once more, by <= u (||e||^2 + 2|z||e|) (1 + g_d) <= 2u (1 + g_d) (||z||^2 + ||e||^2).
    So 2E <= (4 d + 4) u (1 + 2 d u) S for S = ||z||^2 + max ||e||^2; S itself is computed in fp32
    (relative error <= g_d + u): (4 d + 8) u (1 + 2 d u) covers that with room to spare."""
    d = max(int(d), 1)
    return (4.0 * d + 8.0) * unit * (1.0 + 2.0 * d * unit)


def torch_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of torch's fp32 GEMMs under the current matmul precision settings: TF32
    ("high", or CUDA's allow_tf32) keeps 10 mantissa bits, bf16 ("medium") 7."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0 ** -8
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return 2.0 ** -11
    return FP32_EPS


def _unsure_rows(z: torch.Tensor, book_sq: torch.Tensor, best: torch.Tensor,
                 second: torch.Tensor, unit: float) -> torch.Tensor:
    """(N,) bool: rows whose fp32 best and second-best scores are within the error margin."""
    scale = z.pow(2).sum(1).double() + float(book_sq.max())              # (N,) S per row
    gap = second.double() - best.double()                                # NaN rows: never unsure
    return gap <= error_margin(z.shape[1], unit) * scale


def _redecide(z: torch.Tensor, book: torch.Tensor, book_sq: torch.Tensor, idx: torch.Tensor,
              unsure: torch.Tensor) -> int:
    """The `unsure` rows (bool (N,)) get the float64 argmin, written into idx in place.
    Returns how many rows were re-decided."""
    rows = unsure.nonzero().squeeze(1)
    if rows.numel() == 0:
        return 0
    k, d = book.shape
    # re-score those rows in fp32 (any blocking will do: the candidate rule only needs the bound)
    book_t = book.t()
    coef = error_margin(d, torch_unit_roundoff(z.device))
    step = max(1, _EXACT_BYTES // (8 * k * d))
    for j in range(0, rows.numel(), step):
        sel = rows[j:j + step]
        zs = z[sel]
        scores = torch.addmm(book_sq, zs, book_t, beta=1.0, alpha=-2.0)   # (s, K)
        margin = coef * (zs.pow(2).sum(1).double() + float(book_sq.max()))
        limit = scores.min(1).values.double() + margin
        idx[sel] = exact_among_candidates(zs, book, scores, limit)
    return int(rows.numel())


def exact_among_candidates(z: torch.Tensor, book: torch.Tensor, scores: torch.Tensor,
                           limit: torch.Tensor) -> torch.Tensor:
    """Near-tie rows: the float64 argmin over each row's candidates (every code whose fp32 score
    is <= `limit`, the row's best + 2E: the exact nearest is among them, by the error bound),
    ties -> lowest index. z: (s, d), scores: (s, K) fp32, limit: (s,) float64 -> (s,) int64."""
    s = z.shape[0]
    near = scores.double() <= limit[:, None]                             # (s, K)
    r, c = near.nonzero(as_tuple=True)                                   # candidate pairs, row-major
    diff = z.double()[r] - book.double()[c]                              # (P, d) float64, exact
    dist = torch.zeros(r.shape[0], dtype=torch.float64, device=z.device)
    for i in range(diff.shape[1]):   # summed in index order: the same sum on every device
        dist += diff[:, i] * diff[:, i]
    row_min = torch.full((s,), float("inf"), dtype=torch.float64, device=z.device)
    row_min.scatter_reduce_(0, r, dist, "amin")
    win = dist == row_min[r]
    out = torch.full((s,), book.shape[0], dtype=torch.long, device=z.device)
    return out.scatter_reduce_(0, r[win], c[win], "amin")


def ambiguous_fraction(z: torch.Tensor, codebook: torch.Tensor) -> float:
    """Share of rows the float64 re-decision handles (for benchmarks and docs)."""
    z, book = z.float().contiguous(), codebook.float().contiguous()
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        return _search(z, book, 0, True)[1] / max(z.shape[0], 1)


# ---- the fp32 pass: (idx, unsure) per row: the fp32 winner, and whether it is uncertain ---------
def _fp32_pass(z: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor, chunk_rows: int,
               two: bool):
    """addmm per block (norms folded in), then argmin (two=False: unsure is None) or the best
    two."""
    n, k = z.shape[0], codebook.shape[0]
    chunk = chunk_rows or auto_chunk_rows(k, z.device)
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    best = torch.empty(n, dtype=torch.float32, device=z.device) if two else None
    second = torch.empty_like(best) if two else None
    codebook_t = codebook.t().contiguous()           # (D, K): contiguous for the GEMM
    scores = torch.empty(min(chunk, n), k, dtype=torch.float32, device=z.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = scores[: stop - start]
        # block = ||e||^2 - 2 z e^T   (rows, K)
        torch.addmm(code_sq, z[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=block)
        if two:
            idx[start:stop], best[start:stop], second[start:stop] = best_two(block)
        else:
            idx[start:stop] = argmin_rows(block)
    if not two:
        return idx, None
    return idx, _unsure_rows(z, code_sq, best, second, torch_unit_roundoff(z.device))


def argmin_rows(scores: torch.Tensor) -> torch.Tensor:
    """(n, K) fp32 -> (n,) int64 first index of each row's minimum, like torch.argmin; on CPU
    through numpy's SIMD argmin, which is faster than torch's (docs/benchmarks.md, Nearest-code search)."""
    if scores.device.type == "cpu":
        return torch.from_numpy(scores.numpy().argmin(axis=1))
    return scores.argmin(dim=1)


def best_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, K) fp32 -> (argmin (n,) int64, min (n,), second smallest (n,)); the argmin entry of
    each row is overwritten with +inf. First index among equal minima, like torch.min. On CPU
    through numpy, whose SIMD argmin/min are several times faster than torch.min(dim=1)."""
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
