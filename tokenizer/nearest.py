"""The one nearest-codebook search: exact, and independent of the batch.

`nearest_codes(z, codebook)` returns, for each row of z, the index of the nearest code by squared
L2, EQUAL to the float64 argmin of sum((z - e)^2) over the same fp32 inputs, lowest index among
equal minima, whatever the batch size, the row's position in it, the thread count or back end.
The quantiser (search and training forward), `VQVAE.encode` and the tokenize stage all use it.

How: argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): one fp32 GEMM per row block ranks
the codes (||z||^2 is constant per row). Each back end returns per row the fp32 winner, its score
and the second-best score. Every fp32 score is within E of its exact value (`error_margin`), so a
row whose best and second-best scores are more than 2E apart has a certain winner, the same one
however the GEMM was blocked; only the other rows ("ambiguous": near-ties) are re-decided in
float64, among the codes scoring within 2E of their best (`_redecide`). Memory is O(rows x K),
never O(N x K).

Back ends of the fp32 pass, same results:
- "native" (CPU): per block of rows, torch.mm (torch's public API, on torch's threads) against
  the codebook pre-scaled by -2 (exact), then one C pass (`vqtok_best_two_update`: AVX2 when the
  CPU has it, OpenMP over rows) adds ||e||^2 and keeps each row's best two across column tiles.
  The C pass is built on first use through cffi's public API (`FFI.set_source` + `FFI.compile`,
  which finds the compiler and platform flags through setuptools), without FMA contraction, and
  links the libgomp torch already loaded, so it runs on torch's own worker threads. The build
  and the first self-check against torch run in a child process: cffi's compile changes the
  working directory of the whole process, and a kernel that crashes must crash the child, never
  the caller. The child publishes the module atomically into a cache directory, keyed by the C
  source, the flags, $CC, the CPU, torch, cffi and the Python ABI, and leaves an ".ok" marker
  next to it per torch build, so later processes skip the child. This process then loads the
  module and runs the same self-check again before use. Calls through cffi release the GIL. If
  anything fails (no compiler or Python headers, no cffi or setuptools, a failed or crashed
  check, any exception), one RuntimeWarning and the "torch" back end.
- "torch" (any device, and CPU fallback): addmm with the norms folded in, then the best two.
Set VQTOK_NEAREST_BACKEND=torch to skip the native back end (and the compiler) altogether.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .storage import write_bytes_atomic

log = logging.getLogger(__name__)

_CACHE_BYTES = 4 << 20      # torch back end on CPU: target size of one score block (the fastest measured)
_NATIVE_ROWS = 512          # native back end: rows per block (GEMM efficiency vs cache)
_NATIVE_TILE_BYTES = 16 << 20  # native back end: split K into column tiles beyond 16 MiB
_EXACT_BYTES = 64 << 20     # bound on one float64 candidate block of the re-decision
BACKENDS = ("auto", "native", "torch")

FP32_EPS = 2.0 ** -24       # unit roundoff of fp32


def auto_chunk_rows(num_codes: int, device: torch.device) -> int:
    if device.type == "cpu":
        rows = _CACHE_BYTES // (4 * max(num_codes, 1))
        return int(max(16, min(rows, 4096)))
    # accelerators: bound the block at ~256 MiB
    return int(max(256, min((256 << 20) // (4 * max(num_codes, 1)), 65536)))


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = 0, *,
                  backend: str = "auto", exact: bool = True) -> torch.Tensor:
    """z: (N, D), codebook: (K, D) -> (N,) int64 index of the nearest code (squared L2).

    exact=True: the float64 argmin (ties -> lowest index), independent of batch and position.
    exact=False: the fp32 argmin alone (near-ties may go either way, depending on blocking).
    chunk_rows: rows per score block (0 = automatic). backend: "auto" (native kernel on CPU when
    it builds, else torch), "native" (raise if unavailable) or "torch".
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_codes: z {tuple(z.shape)} and codebook {tuple(codebook.shape)} "
                         "must be (N, D) and (K, D)")
    if backend not in BACKENDS:
        raise ValueError(f"nearest_codes: backend {backend!r} is not one of {BACKENDS}")
    if codebook.shape[0] == 0:
        raise ValueError("nearest_codes: the codebook is empty (K = 0)")
    if chunk_rows < 0:
        raise ValueError(f"nearest_codes: chunk_rows = {chunk_rows} must be >= 0 (0 = automatic)")
    z = z.float().contiguous()
    codebook = codebook.to(device=z.device, dtype=torch.float32).contiguous()
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        idx, _ = _search(z, codebook, chunk_rows, backend, exact)
    return idx


def _search(z: torch.Tensor, book: torch.Tensor, chunk_rows: int, backend: str, exact: bool):
    """-> (idx (N,) int64, number of rows re-decided in float64)."""
    exact = exact and book.shape[0] > 1
    book_sq = book.pow(2).sum(1)                                         # (K,)
    kernel = _pick_kernel(z, book, backend)
    if kernel is not None:
        idx, unsure = _fp32_native(kernel, z, book, book_sq, chunk_rows, exact)
    else:
        idx, unsure = _fp32_torch(z, book, book_sq, chunk_rows, exact)
    if not exact:
        return idx, 0
    return idx, _redecide(z, book, book_sq, idx, unsure)


def _pick_kernel(z: torch.Tensor, codebook: torch.Tensor, backend: str):
    if backend == "torch":
        return None
    usable = z.device.type == "cpu" and codebook.shape[0] < 2**31 - 64
    kernel = native_kernel() if usable else None
    if backend == "native" and kernel is None:
        raise RuntimeError("nearest_codes: the native CPU kernel is unavailable "
                           f"(device {z.device.type}; {_native_error or 'not usable for this input'})")
    return kernel


# ---- exactness: the error bound and the float64 re-decision --------------------------------------
def error_margin(d: int, unit: float = FP32_EPS) -> float:
    """2E / (||z||^2 + max_k ||e_k||^2), E bounding the error of one computed score
    s_k = fl(fl(||e_k||^2) + fl(-2 z.e_k)) in floating point of unit roundoff `unit`:
    fl(||e||^2) errs by <= g_d ||e||^2 (g_d = d u / (1 - d u), any summation order, so also a
    BLAS's blocked sums and FMA); -2 is a power of two, so fl(-2 z.e) = -2 fl(z.e) (the pre-scaled
    codebook changes nothing) and errs by <= 2 g_d sum|z_i e_i| <= g_d (||z||^2 + ||e||^2); the
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
    for i in range(diff.shape[1]):   # summed in index order, as the C kernel: identical results
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
        return _search(z, book, 0, "auto", True)[1] / max(z.shape[0], 1)


# ---- the fp32 pass: (idx, unsure) per row: the fp32 winner, and whether it is uncertain ---------
def _fp32_torch(z: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor, chunk_rows: int,
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
            torch.argmin(block, dim=1, out=idx[start:stop])
    if not two:
        return idx, None
    return idx, _unsure_rows(z, code_sq, best, second, torch_unit_roundoff(z.device))


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


def _fp32_native(kernel, z: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor,
                 chunk_rows: int, exact: bool):
    book_t = (codebook * -2.0).t().contiguous()            # (D, K); *-2 is exact in fp32
    idx, best, second = _blocked_pass(kernel, z, book_t, code_sq, chunk_rows)
    unsure = _unsure_rows(z, code_sq, best, second, torch_unit_roundoff(z.device)) if exact else None
    return idx, unsure


def native_blocks(n: int, k: int, chunk_rows: int = 0) -> tuple[int, int]:
    """(rows, cols) of one score block of the native back end: the GEMM's blocking."""
    rows = min(chunk_rows or _NATIVE_ROWS, n)
    cols = k if chunk_rows else max(64, min(k, _NATIVE_TILE_BYTES // (4 * rows)))
    return rows, cols


def _blocked_pass(kernel, z, book_t, code_sq, chunk_rows: int):
    """torch.mm per block (torch's threads) + the C bias/best-two pass.
    -> (idx, best, second), each (N,): the fp32 winner, its score and the second-best score."""
    n, k = z.shape[0], book_t.shape[1]
    rows, tile = native_blocks(n, k, chunk_rows)
    idx = torch.empty(n, dtype=torch.long)
    best, second = torch.empty(n), torch.empty(n)           # running best two over column tiles
    scores = torch.empty(rows * tile, dtype=torch.float32)  # one (rows, cols) block, reused
    threads = torch.get_num_threads()
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        for c0 in range(0, k, tile):
            c1 = min(c0 + tile, k)
            block = scores[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(z[r0:r1], book_t[:, c0:c1], out=block)   # -2 z e^T  (rows, cols)
            kernel(block.data_ptr(), r1 - r0, c1 - c0, c1 - c0, code_sq.data_ptr() + 4 * c0, c0,
                   best.data_ptr() + 4 * r0, second.data_ptr() + 4 * r0,
                   idx.data_ptr() + 8 * r0, threads)
    return idx, best, second


# ---- the native kernel: C source, build (cffi, in a child process), cache, load ------------------
_C_SOURCE = r"""
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Running best two of one row: v_j = s[j] + b[j], j in [0, k). (*best, *idx) is the minimum and
   its index, updated only when some v_j is strictly smaller, so the first index among equal
   minima wins, also across column tiles; *second is the smallest value at any other index (equal
   to *best on a tie). NaNs never compare smaller and are skipped. */
static void row_best_two(const float *s, const float *b, int64_t k, int64_t col0,
                         float *best, float *second, int64_t *idx) {
    float bv = *best, sv = *second;
    int64_t bi = *idx, j = 0;
#ifdef __AVX2__
    if (k >= 32) {
        const float inf = __builtin_inff();
        __m256 m0 = _mm256_set1_ps(inf), m1 = m0, m2 = m0, m3 = m0;    /* lane minima */
        __m256 n0 = m0, n1 = m0, n2 = m0, n3 = m0;                      /* lane second minima */
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
        __m256i c0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i c1 = _mm256_add_epi32(c0, _mm256_set1_epi32(8));
        __m256i c2 = _mm256_add_epi32(c0, _mm256_set1_epi32(16));
        __m256i c3 = _mm256_add_epi32(c0, _mm256_set1_epi32(24));
        const __m256i step = _mm256_set1_epi32(32);
        /* second <- min(max(m, v), second), m <- min(v, m): a NaN v leaves both (max_ps and
           min_ps return their second operand when one is NaN: max(m, NaN) = NaN, then
           min(NaN, second) = second; min(NaN, m) = m) */
#define VQ_LANE(m, n2nd, i, c, off) do { \
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(s + j + off), _mm256_loadu_ps(b + j + off)); \
            __m256 lt = _mm256_cmp_ps(v, m, _CMP_LT_OQ); \
            n2nd = _mm256_min_ps(_mm256_max_ps(m, v), n2nd); \
            m = _mm256_min_ps(v, m); \
            i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i), \
                                                     _mm256_castsi256_ps(c), lt)); \
            c = _mm256_add_epi32(c, step); } while (0)
        for (; j + 32 <= k; j += 32) {
            VQ_LANE(m0, n0, i0, c0, 0); VQ_LANE(m1, n1, i1, c1, 8);
            VQ_LANE(m2, n2, i2, c2, 16); VQ_LANE(m3, n3, i3, c3, 24);
        }
#undef VQ_LANE
        /* merge the 4 accumulators lane-wise: b wins on a smaller minimum, or an equal one at
           a lower index; the second is min(both seconds, the larger minimum) */
#define VQ_MERGE(ma, na, ia, mb, nb, ib) do { \
            __m256 ltb = _mm256_or_ps(_mm256_cmp_ps(mb, ma, _CMP_LT_OQ), \
                _mm256_and_ps(_mm256_cmp_ps(mb, ma, _CMP_EQ_OQ), \
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(ia, ib)))); \
            na = _mm256_min_ps(_mm256_min_ps(na, nb), _mm256_max_ps(ma, mb)); \
            ma = _mm256_blendv_ps(ma, mb, ltb); \
            ia = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(ia), \
                                                      _mm256_castsi256_ps(ib), ltb)); } while (0)
        VQ_MERGE(m0, n0, i0, m1, n1, i1);
        VQ_MERGE(m2, n2, i2, m3, n3, i3);
        VQ_MERGE(m0, n0, i0, m2, n2, i2);
#undef VQ_MERGE
        float mv[8], nv[8];
        int32_t iv[8];
        _mm256_storeu_ps(mv, m0);
        _mm256_storeu_ps(nv, n0);
        _mm256_storeu_si256((__m256i *)iv, i0);
        /* each lane holds its own first minimum; the lowest index among equal minima wins */
        float tv = inf, ts = inf;
        int64_t ti = 0;
        int tl = -1;
        for (int l = 0; l < 8; l++)
            if (mv[l] < tv || (mv[l] == tv && iv[l] < ti)) { tv = mv[l]; ti = iv[l]; tl = l; }
        for (int l = 0; l < 8; l++) {   /* second: every other lane's minimum, every lane's second */
            if (l != tl && mv[l] < ts) ts = mv[l];
            if (nv[l] < ts) ts = nv[l];
        }
        if (tv < bv) { sv = bv < ts ? bv : ts; bv = tv; bi = col0 + ti; }
        else { if (tv < sv) sv = tv; if (ts < sv) sv = ts; }
    }
#endif
    for (; j < k; j++) {
        float v = s[j] + b[j];
        if (v < bv) { sv = bv; bv = v; bi = col0 + j; }
        else if (v < sv) sv = v;
    }
    *best = bv;
    *second = sv;
    *idx = bi;
}

/* scores: (rows, k) with row stride ld; bias: (k,); col0: global index of column 0.
   best/second/idx: (rows,) running best two and the index of the best; reset when col0 == 0. */
void vqtok_best_two_update(const float *scores, int64_t rows, int64_t k, int64_t ld,
                           const float *bias, int64_t col0, float *best, float *second,
                           int64_t *idx, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * k >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        if (col0 == 0) { best[r] = __builtin_inff(); second[r] = __builtin_inff(); idx[r] = 0; }
        row_best_two(scores + r * ld, bias, k, col0, best + r, second + r, idx + r);
    }
}
"""

# the one entry point, as cffi compiles a call to it (the declaration must match the source's)
_CDEF = """
void vqtok_best_two_update(const float *scores, int64_t rows, int64_t k, int64_t ld,
                           const float *bias, int64_t col0, float *best, float *second,
                           int64_t *idx, int nthreads);
"""

_lock = threading.Lock()
_native = None          # the loaded kernel (a callable taking tensor addresses)
_native_error = None    # why it is unavailable (str), once tried
_tried = False
_CHILD_TIMEOUT_S = 300  # build + self-check in the child, torch import included
_ANSWER = "vqtok-nearest-kernel: "   # the child's answer line on stdout: json [name, path]
_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); from tokenizer import nearest as m; "
          "m._child_main()")


def native_kernel():
    """The C best-two pass (a callable taking tensor addresses), or None when it cannot be built,
    checked or loaded here; then one RuntimeWarning per process and the torch back end."""
    global _native, _native_error, _tried
    if _tried:
        return _native
    with _lock:
        if not _tried:
            if os.environ.get("VQTOK_NEAREST_BACKEND", "").lower() == "torch":
                _native_error = "disabled by VQTOK_NEAREST_BACKEND=torch"
            else:
                try:
                    kernel = _load_module(*_build())
                    _self_check(kernel)           # checked in a child first; cheap here
                    _native = kernel
                except Exception as exc:  # any failure here means "use the torch back end"
                    _native_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn("vqtok: native nearest-code kernel unavailable, using the torch "
                                  f"path ({_native_error})", RuntimeWarning, stacklevel=3)
            _tried = True
    return _native


def _flag_sets() -> list[list[str]]:
    """Compiler flags, most preferred first. Never FMA contraction (the pass adds s + b, which
    the self-check compares with torch bit for bit). Without OpenMP the pass is single-threaded;
    without -march=native it has no AVX2 body."""
    base = ["-O3", "-ffp-contract=off"]
    return [base + arch + omp for arch in (["-march=native"], []) for omp in (["-fopenmp"], [])]


def _cpu_signature() -> str:
    """Identifies the CPU features -march=native compiled for (cache dirs may be shared)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{flags}"


def _ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or importlib.machinery.EXTENSION_SUFFIXES[0]


def _module_name(source: str, flags: list[str]) -> str:
    """The built module's name (and file name stem): a hash of everything its binary depends on."""
    import cffi   # imported here: without cffi the native back end is simply unavailable
    key = "\n".join([source, _CDEF, " ".join(flags), os.environ.get("CC", ""), _cpu_signature(),
                     torch.__version__, cffi.__version__, sys.implementation.cache_tag,
                     _ext_suffix()])
    return "_vqtok_nearest_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    env = os.environ.get("VQTOK_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vqtok"


def _private_tmp() -> Path:
    """A per-user 0700 directory in the temp dir (a shared /tmp must not let others plant a .so)."""
    path = Path(tempfile.gettempdir()) / f"vqtok-{os.getuid() if hasattr(os, 'getuid') else 'u'}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise RuntimeError(f"{path} is not a private directory")
    return path


def _candidate_dirs():
    for make in (_cache_dir, _private_tmp):
        try:
            folder = make()
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
        except Exception as exc:
            log.debug("vqtok: cache dir unusable: %s", exc)


def _checked_marker(path: Path) -> Path:
    """Next to a built module: present once its self-check passed in a child process with this
    torch build."""
    torch_key = hashlib.sha256(f"{torch.__file__}|{torch.__version__}".encode()).hexdigest()[:12]
    return path.with_name(f"{path.name}.{torch_key}.ok")


def _build() -> tuple[str, Path]:
    """(module name, path) of a built kernel whose self-check has passed in a child process: a
    cached one, or one a child process builds and checks now. Raises on any failure."""
    source = _C_SOURCE
    candidates = [(flags, _module_name(source, flags)) for flags in _flag_sets()]
    folders = list(_candidate_dirs())
    if not folders:
        raise RuntimeError("no usable cache directory (VQTOK_CACHE_DIR, ~/.cache or the temp dir)")
    for _, name in candidates:
        for folder in folders:
            path = folder / f"{name}{_ext_suffix()}"
            if path.exists() and _checked_marker(path).exists():
                return name, path
    request = {"source": source, "candidates": candidates, "folders": [str(f) for f in folders]}
    root = str(Path(__file__).resolve().parent.parent)          # holds the tokenizer package
    env = {**os.environ, "VQTOK_NEAREST_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, root], input=json.dumps(request),
                          capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, env=env)
    answer = [ln for ln in proc.stdout.splitlines() if ln.startswith(_ANSWER)]
    if proc.returncode != 0 or not answer:
        if proc.returncode < 0:
            try:
                why = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                why = f"killed by signal {-proc.returncode}"
        else:
            why = (proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"])[0]
        raise RuntimeError(f"building or self-checking the C pass in a child process failed: {why}")
    name, path = json.loads(answer[-1][len(_ANSWER):])
    return name, Path(path)


def _child_main() -> None:
    """In the child process (`_build`): the first flag set's module that is cached or compiles,
    self-checked here (a kernel that crashes kills this process only), marked as checked, and
    answered on stdout. The request comes on stdin."""
    request = json.load(sys.stdin)
    folders = [Path(f) for f in request["folders"]]
    writable = [f for f in folders if os.access(f, os.W_OK | os.X_OK)]
    errors = []
    for flags, name in request["candidates"]:
        cached = [f / f"{name}{_ext_suffix()}" for f in folders]
        cached = [p for p in cached if p.exists()]
        try:
            if cached:
                path = cached[0]
            elif writable:
                path = _compile(request["source"], flags, writable[0], name)
            else:
                raise RuntimeError(f"none of {request['folders']} is writable")
        except Exception as exc:
            errors.append(f"{' '.join(flags)}: {type(exc).__name__}: {str(exc)[:240]}")
            continue
        _self_check(_load_module(name, path))
        write_bytes_atomic(str(_checked_marker(path)), b"ok\n")
        print(_ANSWER + json.dumps([name, str(path)]), flush=True)
        return
    raise RuntimeError(f"the C pass did not build with any of {len(errors)} flag sets "
                       f"(last: {errors[-1] if errors else 'none'})")


def _compile(source: str, flags: list[str], folder: Path, name: str) -> Path:
    """Build the cffi module `name` (cffi's public API; it runs the compiler through setuptools)
    in a private temporary directory, then publish it atomically into `folder`. Only ever in the
    child: cffi's compile changes the working directory of the whole process while it runs."""
    import cffi
    target = folder / f"{name}{_ext_suffix()}"
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))   # this builder's own
    try:
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        ffi.set_source(name, source, extra_compile_args=flags,
                       extra_link_args=[f for f in flags if f == "-fopenmp"])
        built = ffi.compile(tmpdir=str(build))
        os.replace(built, target)          # atomic publish: concurrent builders race safely
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def _load_module(name: str, path: Path):
    """Import the built cffi module; -> its function as a callable taking addresses (ints), as
    `_blocked_pass` passes them. cffi's compiled wrappers release the GIL during the C call."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ffi, fn = module.ffi, module.lib.vqtok_best_two_update
    cast, f32, i64 = ffi.cast, ffi.typeof("float *"), ffi.typeof("int64_t *")

    def kernel(scores, rows, k, ld, bias, col0, best, second, idx, nthreads):
        fn(cast(f32, scores), rows, k, ld, cast(f32, bias), col0, cast(f32, best),
           cast(f32, second), cast(i64, idx), nthreads)
    return kernel


def _self_check(fn) -> None:
    """A miscompiled or mismatched kernel must never be used: compare with torch on a few blocks
    (several widths so both the vector body and the scalar tail run, plus a column-tiled call;
    small integers, so exact ties and a second best equal to the best occur)."""
    gen = torch.Generator().manual_seed(0)
    for rows, k in ((5, 7), (9, 40), (33, 100), (3, 257), (40, 64)):
        scores = torch.randint(-20, 20, (rows, k), generator=gen).float()
        bias = torch.randint(-20, 20, (k,), generator=gen).float()
        total = scores + bias
        two = total.topk(2, dim=1, largest=False).values
        expect = (torch.argmin(total, dim=1), two[:, 0], two[:, 1])
        for tile in (k, 33):
            best, second = torch.empty(rows), torch.empty(rows)
            idx = torch.empty(rows, dtype=torch.long)
            for c0 in range(0, k, tile):
                c1 = min(c0 + tile, k)
                block = scores[:, c0:c1].contiguous()
                fn(block.data_ptr(), rows, c1 - c0, c1 - c0, bias[c0:].data_ptr(), c0,
                   best.data_ptr(), second.data_ptr(), idx.data_ptr(), 1)
            if not all(torch.equal(a, b) for a, b in zip((idx, best, second), expect)):
                raise RuntimeError(f"self-check failed for a ({rows}, {k}) block, tile {tile}")
