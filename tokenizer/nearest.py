"""Exact nearest-codebook search without the N x K distance matrix.

argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): the ||z||^2 term is constant per row,
so one addmm per chunk gives the ranking. Rows are processed in chunks sized so the (chunk, K)
score block stays in cache; memory is O(chunk x K), never O(N x K).
"""
from __future__ import annotations

import torch

_CACHE_BYTES = 1 << 20  # target size of one score block on CPU (L2-sized)


def auto_chunk_rows(num_codes: int, device: torch.device) -> int:
    if device.type == "cpu":
        rows = _CACHE_BYTES // (4 * max(num_codes, 1))
        return int(max(16, min(rows, 4096)))
    # accelerators: bound the block at ~256 MiB
    return int(max(256, min((256 << 20) // (4 * max(num_codes, 1)), 65536)))


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
    """z: (N, D), codebook: (K, D) -> (N,) int64 index of the nearest code (squared L2, fp32)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_codes: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} "
                         "must be (N, D) and (K, D)")
    z = z.float()
    codebook = codebook.float()
    n, k = z.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    chunk = chunk_rows or auto_chunk_rows(k, z.device)
    code_sq = codebook.pow(2).sum(1)                 # (K,)
    codebook_t = codebook.t().contiguous()           # (D, K): contiguous for the GEMM
    scores = torch.empty(min(chunk, n), k, dtype=torch.float32, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = scores[: stop - start]
            # block = ||e||^2 - 2 z e^T   (chunk, K)
            torch.addmm(code_sq, z[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=block)
            torch.argmin(block, dim=1, out=out[start:stop])
    return out
