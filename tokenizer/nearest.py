"""Exact nearest-codebook search without the N x K distance matrix.

argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): the ||z||^2 term is constant per row, so
one GEMM per block gives the ranking. Rows are processed in blocks sized so the (rows, K) score
block stays in cache; memory is O(rows x K), never O(N x K). All arithmetic is fp32.

Back ends, same semantics (first index among equal minima, like torch.argmin):
- "native" (CPU), fused: one C call, ONE OpenMP parallel region; each thread runs MKL's
  single-threaded sgemm_ (exported by libtorch_cpu, the routine torch's own GEMMs use) on its own
  small row block into an L2-sized buffer, against the codebook pre-scaled by -2 (exact), then
  adds ||e||^2 and takes the row argmin from cache in one AVX2 pass. torch.argmin over a block
  costs ~70% of the GEMM on a 2-core AVX2 machine; this pass a few %, and one region per call
  means one barrier (busy machines stall every barrier). Without MKL: "blocked", torch.mm per
  block + the same C pass. The C code links the libgomp torch already loaded, so it runs on
  torch's own worker threads. It is compiled with the system C compiler on first use, cached,
  and checked against brute force; if any of that fails the "torch" back end is used.
- "torch" (any device, and CPU fallback): addmm with the norms folded in, then torch.argmin.
Set VQTOK_NEAREST_BACKEND=torch to skip the compiler altogether.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CACHE_BYTES = 4 << 20      # torch back end on CPU: target size of one score block (measured)
_NATIVE_ROWS = 512          # native back end: rows per block (GEMM efficiency vs cache, measured)
_NATIVE_TILE_BYTES = 16 << 20  # native back end: split K into column tiles beyond a 16 MiB block
_FUSED_BLOCK_BYTES = 1 << 20  # fused path: per-thread score block (64 rows at K=4096, measured)
BACKENDS = ("auto", "native", "torch")


def auto_chunk_rows(num_codes: int, device: torch.device) -> int:
    if device.type == "cpu":
        rows = _CACHE_BYTES // (4 * max(num_codes, 1))
        return int(max(16, min(rows, 4096)))
    # accelerators: bound the block at ~256 MiB
    return int(max(256, min((256 << 20) // (4 * max(num_codes, 1)), 65536)))


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = 0, *,
                  backend: str = "auto") -> torch.Tensor:
    """z: (N, D), codebook: (K, D) -> (N,) int64 index of the nearest code (squared L2, fp32).

    chunk_rows: rows per score block (0 = automatic). backend: "auto" (native kernel on CPU when
    it compiles, else torch), "native" (raise if unavailable) or "torch".
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
    z = z.float()
    codebook = codebook.to(device=z.device, dtype=torch.float32)
    n = z.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        kernel = _pick_kernel(z, codebook, backend)
        if kernel is not None:
            return _nearest_native(kernel, z, codebook, chunk_rows)
        return _nearest_torch(z, codebook, chunk_rows)


def _pick_kernel(z: torch.Tensor, codebook: torch.Tensor, backend: str):
    if backend == "torch":
        return None
    usable = z.device.type == "cpu" and codebook.shape[0] < 2**31 - 64
    kernel = native_kernel() if usable else None
    if backend == "native" and kernel is None:
        raise RuntimeError("nearest_codes: the native CPU kernel is unavailable "
                           f"(device {z.device.type}; compile error: {_native_error or 'none'})")
    return kernel


def _nearest_torch(z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    n, k = z.shape[0], codebook.shape[0]
    chunk = chunk_rows or auto_chunk_rows(k, z.device)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    code_sq = codebook.pow(2).sum(1)                 # (K,)
    codebook_t = codebook.t().contiguous()           # (D, K): contiguous for the GEMM
    scores = torch.empty(min(chunk, n), k, dtype=torch.float32, device=z.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = scores[: stop - start]
        # block = ||e||^2 - 2 z e^T   (rows, K)
        torch.addmm(code_sq, z[start:stop], codebook_t, beta=1.0, alpha=-2.0, out=block)
        torch.argmin(block, dim=1, out=out[start:stop])
    return out


def _nearest_native(kernel, z: torch.Tensor, codebook: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    z = z.contiguous()
    code_sq = codebook.pow(2).sum(1).contiguous()          # (K,)
    book_t = (codebook * -2.0).t().contiguous()            # (D, K); *-2 is exact in fp32
    if _fused is not None:
        return _nearest_fused(z, book_t, code_sq, chunk_rows)
    return _nearest_blocked(kernel, z, book_t, code_sq, chunk_rows)


def _nearest_fused(z, book_t, code_sq, chunk_rows: int) -> torch.Tensor:
    """One C call: per-thread sgemm on small row blocks + argmin from L2 (see _C_SOURCE)."""
    n, d = z.shape
    k = book_t.shape[1]
    rows = min(chunk_rows or max(8, min(256, _FUSED_BLOCK_BYTES // (4 * k))), n)
    threads = max(1, min(torch.get_num_threads(), -(-n // rows)))
    work = torch.empty(threads * rows * k, dtype=torch.float32)   # one (rows, K) block per thread
    out = torch.empty(n, dtype=torch.long)
    fn, gemm, set_local = _fused
    fn(gemm, set_local, z.data_ptr(), n, d, book_t.data_ptr(), k, code_sq.data_ptr(),
       out.data_ptr(), rows, threads, work.data_ptr(), 1)
    return out


def _nearest_blocked(kernel, z, book_t, code_sq, chunk_rows: int) -> torch.Tensor:
    """torch.mm per block (torch's threads) + the C bias/argmin pass; when no BLAS symbol."""
    n, k = z.shape[0], book_t.shape[1]
    rows = min(chunk_rows or _NATIVE_ROWS, n)
    tile = k if chunk_rows else max(64, min(k, _NATIVE_TILE_BYTES // (4 * rows)))
    out = torch.empty(n, dtype=torch.long)
    best = torch.empty(rows, dtype=torch.float32)          # running minimum over column tiles
    scores = torch.empty(rows * tile, dtype=torch.float32)  # one (rows, cols) block, reused
    threads = torch.get_num_threads()
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        best.fill_(float("inf"))
        for c0 in range(0, k, tile):
            c1 = min(c0 + tile, k)
            block = scores[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(z[r0:r1], book_t[:, c0:c1], out=block)   # -2 z e^T  (rows, cols)
            kernel(block.data_ptr(), r1 - r0, c1 - c0, c1 - c0, code_sq.data_ptr() + 4 * c0, c0,
                   best.data_ptr(), out.data_ptr() + 8 * r0, threads)
    return out


# ---- the native kernel: C source, compilation, cache ---------------------------------------------
_C_SOURCE = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* Running argmin of one row: v_j = s[j] + b[j], j in [0, k); updates (*best, *idx) when some v_j
   is strictly smaller, so the first index among equal minima wins, also across column tiles.
   NaNs never compare smaller and are skipped. */
static void row_update(const float *s, const float *b, int64_t k, int64_t col0,
                       float *best, int64_t *idx) {
    float bv = *best;
    int64_t bi = *idx, j = 0;
#ifdef __AVX2__
    if (k >= 32) {
        const float inf = __builtin_inff();
        __m256 m0 = _mm256_set1_ps(inf), m1 = m0, m2 = m0, m3 = m0;
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
        __m256i c0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i c1 = _mm256_add_epi32(c0, _mm256_set1_epi32(8));
        __m256i c2 = _mm256_add_epi32(c0, _mm256_set1_epi32(16));
        __m256i c3 = _mm256_add_epi32(c0, _mm256_set1_epi32(24));
        const __m256i step = _mm256_set1_epi32(32);
#define VQ_LANE(m, i, c, off) do { \
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(s + j + off), _mm256_loadu_ps(b + j + off)); \
            __m256 lt = _mm256_cmp_ps(v, m, _CMP_LT_OQ); \
            m = _mm256_blendv_ps(m, v, lt); \
            i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i), \
                                                     _mm256_castsi256_ps(c), lt)); \
            c = _mm256_add_epi32(c, step); } while (0)
        for (; j + 32 <= k; j += 32) {
            VQ_LANE(m0, i0, c0, 0); VQ_LANE(m1, i1, c1, 8);
            VQ_LANE(m2, i2, c2, 16); VQ_LANE(m3, i3, c3, 24);
        }
#undef VQ_LANE
        float mv[32];
        int32_t iv[32];
        _mm256_storeu_ps(mv, m0); _mm256_storeu_ps(mv + 8, m1);
        _mm256_storeu_ps(mv + 16, m2); _mm256_storeu_ps(mv + 24, m3);
        _mm256_storeu_si256((__m256i *)iv, i0); _mm256_storeu_si256((__m256i *)(iv + 8), i1);
        _mm256_storeu_si256((__m256i *)(iv + 16), i2); _mm256_storeu_si256((__m256i *)(iv + 24), i3);
        /* each lane holds its own first minimum; the lowest index among equal minima wins */
        float tv = inf;
        int64_t ti = 0;
        for (int l = 0; l < 32; l++)
            if (mv[l] < tv || (mv[l] == tv && iv[l] < ti)) { tv = mv[l]; ti = iv[l]; }
        if (tv < bv) { bv = tv; bi = col0 + ti; }
    }
#endif
    for (; j < k; j++) {
        float v = s[j] + b[j];
        if (v < bv) { bv = v; bi = col0 + j; }
    }
    *best = bv;
    *idx = bi;
}

/* scores: (rows, k) with row stride ld; bias: (k,); col0: global index of column 0.
   best/idx: (rows,) running minimum and its index; idx is only read when best is finite. */
void vqtok_argmin_update(const float *scores, int64_t rows, int64_t k, int64_t ld,
                         const float *bias, int64_t col0, float *best, int64_t *idx,
                         int nthreads) {
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (rows * k >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        if (col0 == 0) idx[r] = 0;
        row_update(scores + r * ld, bias, k, col0, best + r, idx + r);
    }
}

/* Fully fused search: ONE parallel region per call; each thread runs a single-threaded BLAS
   sgemm (Fortran interface, LP64) on its own small row block into its own L2-sized buffer and
   takes the argmin straight from cache. bookT: (D, K) row-major, pre-scaled by -2.
   work: nthreads * rows * k floats (with_argmin = 0 skips the argmin: the benchmark's
   arithmetic limit of this very blocking). set_local: optional mkl_set_num_threads_local. */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, const float *, const int *,
                        const float *, float *, const int *);
typedef int (*set_local_t)(int);
void vqtok_fused_nearest(void *gemm_ptr, void *set_local_ptr, const float *z, int64_t n, int d,
                         const float *bookT, int64_t k, const float *bias, int64_t *out,
                         int rows, int nthreads, float *work, int with_argmin) {
    sgemm_t gemm = (sgemm_t)gemm_ptr;
    set_local_t set_local = (set_local_t)set_local_ptr;
    int64_t nblocks = (n + rows - 1) / rows;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        int prev = set_local ? set_local(1) : 0;   /* the BLAS call must not fork again */
        float *buf = work + (int64_t)t * rows * k;
        const float one = 1.0f, zero = 0.0f;
        const int kk = (int)k, dd = d;
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t r0 = blk * rows;
            int m = (int)(n - r0 < rows ? n - r0 : rows);
            /* column-major view: buf^T (K, m) = bookT^T (K, D) x z_blk^T (D, m) */
            gemm("N", "N", &kk, &m, &dd, &one, bookT, &kk, z + r0 * d, &dd, &zero, buf, &kk);
            for (int r = 0; r < m && with_argmin; r++) {   /* with_argmin = 0: GEMM-only timing */
                float best = __builtin_inff();
                int64_t idx = 0;
                row_update(buf + (int64_t)r * k, bias, k, 0, &best, &idx);
                out[r0 + r] = idx;
            }
        }
        if (set_local) set_local(prev);
    }
}
"""

_lock = threading.Lock()
_native = None          # the ctypes function once loaded
_native_error = None    # why it could not be built (str), once tried
_fused = None           # (fused ctypes function, sgemm_ address, mkl_set_num_threads_local or None)
_tried = False


def native_kernel():
    """The compiled C kernel (a ctypes function), or None when it cannot be built here."""
    global _native, _native_error, _tried, _fused
    if _tried:
        return _native
    with _lock:
        if not _tried:
            if os.environ.get("VQTOK_NEAREST_BACKEND", "").lower() == "torch":
                _native_error = "disabled by VQTOK_NEAREST_BACKEND=torch"
            else:
                try:
                    _native, _fused = _load(_build())
                except Exception as exc:  # any failure here means "use the torch back end"
                    _native_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn("vqtok: native nearest-code kernel unavailable, using the torch "
                                  f"path ({_native_error})", RuntimeWarning, stacklevel=3)
            _tried = True
    return _native


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-shared", "-fPIC", "-std=c99"]
    sets = []
    for omp in (["-fopenmp"], []):       # without OpenMP the kernel is single-threaded
        for arch in (["-march=native"], []):
            sets.append(base + arch + omp)
    return sets


def _cpu_signature() -> str:
    """Identifies the CPU features -march=native compiled for (cache dirs may be shared)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{flags}"


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


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\n".join([_C_SOURCE, compiler, " ".join(flags), _cpu_signature(),
                                        torch.__version__]).encode()).hexdigest()[:16]
        for folder in _candidate_dirs():
            try:
                return _compile(compiler, flags, folder, f"vqtok_nearest_{key}.so")
            except Exception as exc:
                errors.append(f"{' '.join(flags)} in {folder}: {exc}")
    raise RuntimeError("; ".join(errors[-2:]))


def _candidate_dirs():
    for make in (_cache_dir, _private_tmp):
        try:
            folder = make()
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
        except Exception as exc:
            log.debug("vqtok: cache dir unusable: %s", exc)


def _compile(compiler: str, flags: list[str], folder: Path, name: str) -> Path:
    target = folder / name
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)   # unique: concurrent builders race safely
    os.close(fd)
    src = Path(tmp).with_suffix(".c")
    try:
        src.write_text(_C_SOURCE)
        proc = subprocess.run([compiler, *flags, "-o", tmp, str(src)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                               else f"exit {proc.returncode}")
        os.replace(tmp, target)                             # atomic publish
    finally:
        src.unlink(missing_ok=True)
        Path(tmp).unlink(missing_ok=True)
    return target


def _load(path: Path):
    lib = ctypes.CDLL(str(path))   # ctypes releases the GIL during calls
    fn = lib.vqtok_argmin_update
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, c_int]
    fn.restype = None
    _self_check(fn)
    fused = lib.vqtok_fused_nearest
    fused.argtypes = [ptr, ptr, ptr, i64, c_int, ptr, i64, ptr, ptr, c_int, c_int, ptr, c_int]
    fused.restype = None
    try:
        gemm, set_local = _blas_symbols()
        entry = (fused, gemm, set_local)
        _self_check_fused(entry)
    except Exception as exc:       # no usable BLAS symbol: the blocked path (torch.mm + pass)
        log.info("vqtok: fused nearest kernel unavailable (%s); using GEMM + argmin pass", exc)
        entry = None
    return fn, entry


def _blas_symbols():
    """Address of the MKL sgemm_ (LP64 Fortran interface) that torch's CPU library exports and
    uses for its own GEMMs. Only with MKL: another BLAS's ABI (e.g. ILP64) would crash, not fail.
    Inside an OpenMP parallel region MKL runs sequentially (nested parallelism is off)."""
    if not torch.backends.mkl.is_available():
        raise RuntimeError("torch is not built with MKL")
    lib_dir = Path(torch.__file__).parent / "lib"
    names = [p for p in lib_dir.glob("libtorch_cpu.*") if p.suffix in (".so", ".dylib")]
    if not names:
        raise RuntimeError(f"no libtorch_cpu in {lib_dir}")
    lib = ctypes.CDLL(str(names[0]))   # already loaded by torch: this only gets a handle
    return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value, None


def _self_check_fused(entry) -> None:
    """Small-integer data (exact in fp32, so exact ties): must equal the first brute-force
    minimum, for several row counts, codebook widths and both 1 and 2 threads."""
    fn, gemm, set_local = entry
    gen = torch.Generator().manual_seed(1)
    for n, k, d, rows, threads in ((7, 5, 3, 2, 1), (50, 70, 6, 8, 2), (33, 257, 64, 16, 2)):
        z = torch.randint(-3, 4, (n, d), generator=gen).float()
        book = torch.randint(-3, 4, (k, d), generator=gen).float()
        dist = (z[:, None, :] - book[None, :, :]).pow(2).sum(-1)
        expect = torch.argmin(dist, dim=1)
        book_t = (book * -2.0).t().contiguous()
        code_sq = book.pow(2).sum(1).contiguous()
        work = torch.empty(threads * rows * k)
        out = torch.empty(n, dtype=torch.long)
        fn(gemm, set_local, z.data_ptr(), n, d, book_t.data_ptr(), k, code_sq.data_ptr(),
           out.data_ptr(), rows, threads, work.data_ptr(), 1)
        if not torch.equal(out, expect):
            raise RuntimeError(f"fused self-check failed for N={n} K={k} D={d}")


def _self_check(fn) -> None:
    """A miscompiled or mismatched kernel must never be used: compare with torch on a few blocks
    (several widths so both the vector body and the scalar tail run, plus a column-tiled call)."""
    gen = torch.Generator().manual_seed(0)
    for rows, k in ((5, 7), (9, 40), (33, 100), (3, 257)):
        scores = torch.randn(rows, k, generator=gen)
        bias = torch.randn(k, generator=gen)
        expect = torch.argmin(scores + bias, dim=1)
        for tile in (k, 33):
            best = torch.full((rows,), float("inf"))
            idx = torch.empty(rows, dtype=torch.long)
            for c0 in range(0, k, tile):
                c1 = min(c0 + tile, k)
                block = scores[:, c0:c1].contiguous()
                fn(block.data_ptr(), rows, c1 - c0, c1 - c0, bias[c0:].data_ptr(), c0,
                   best.data_ptr(), idx.data_ptr(), 1)
            if not torch.equal(idx, expect):
                raise RuntimeError(f"self-check failed for a ({rows}, {k}) block, tile {tile}")
