"""nearest_codes: the float64 argmin (ties -> lowest index) through every back end, also on
near-ties fp32 cannot order; independent of batch size and position; chunking, autocast,
fallbacks."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from tokenizer import nearest as nm
from tokenizer.nearest import nearest_codes

BACKENDS = ["native", "torch"]


def search(z, book, backend, **kw):
    """nearest_codes through one back end: "native" (torch.mm per block + the C best-two pass,
    which must be available here) or "torch"."""
    if backend == "native":
        assert nm.native_kernel() is not None, nm._native_error
    return nearest_codes(z, book, backend=backend, **kw)


def brute_sq_dist(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances in float64 (exact for the small-integer data below; ~1e-16
    relative otherwise, far below the fp32 effects under test)."""
    z, book = z.double(), book.double()
    return z.pow(2).sum(1, keepdim=True) - 2 * z @ book.t() + book.pow(2).sum(1)


def float64_argmin(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """The reference: float64 sum((z - e)^2) on the same fp32 inputs, first index on ties."""
    out = []
    for i in range(0, z.shape[0], 256):
        zc = z[i:i + 256].double()
        out.append(((zc[:, None, :] - book.double()[None]) ** 2).sum(-1).argmin(1))
    return torch.cat(out)


def near_tie_problem(seed: int = 0, d: int = 16, k: int = 64):
    """A codebook with exact duplicates and codes one or a few fp32 ulp apart, and queries on,
    between and near those codes: rows whose fp32 scores cannot be ordered."""
    g = torch.Generator().manual_seed(seed)
    book = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    book[10] = book[3]                                               # exact tie: 3 must win
    book[20] = book[5]
    book[20, 0] = torch.nextafter(book[5, 0], torch.tensor(2.0))     # one ulp apart
    book[30] = book[7] * (1 + 2 ** -22)                              # a few ulp apart
    book[40] = book[8]
    book[40, d - 1] = torch.nextafter(book[8, d - 1], torch.tensor(-2.0))
    mids = [(book[a] + book[b]) / 2 for a, b in ((3, 10), (5, 20), (7, 30), (8, 40), (1, 2), (4, 9))]
    on = book[[3, 10, 5, 20, 7, 30, 8, 40, 0, k - 1]]
    picks = torch.tensor([3, 5, 7, 8, 10, 20, 30, 40]).repeat(40)
    noisy = book[picks] + 1e-7 * torch.randn(picks.numel(), d, generator=g)
    far = book[torch.randint(0, k, (200,), generator=g)] + 1e-3 * torch.randn(200, d, generator=g)
    z = torch.cat([torch.stack(mids), on, noisy, far, torch.randn(100, d, generator=g)]).float()
    return z, book.float()


def assert_as_near(z, book, idx):
    """The chosen code is as near as the brute-force nearest, up to fp32 rounding of the
    ||e||^2 - 2 z.e expansion (ties and near-ties may pick another index)."""
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],)
    assert int(idx.min()) >= 0 and int(idx.max()) < book.shape[0]
    d = brute_sq_dist(z, book)
    chosen = d.gather(1, idx[:, None])[:, 0]
    best = d.min(1).values
    scale = z.double().pow(2).sum(1) + book.double().pow(2).sum(1).max()
    assert torch.all(chosen - best <= 1e-5 * scale), float((chosen - best - 1e-5 * scale).max())
    # and on random data almost every row picks the very same index
    assert (idx == d.argmin(1)).float().mean() >= 0.99


def integer_data(n, k, d, seed=0):
    """Small integers: every product and sum is exact in fp32, so ties are exact and the first
    index among equal minima (torch.argmin's rule) is the only right answer."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, (n, d), generator=g).float(),
            torch.randint(-3, 4, (k, d), generator=g).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 2, 3), (1, 1, 4), (5, 2, 1), (37, 33, 5), (1000, 100, 64),
                                   (513, 4099, 7), (600, 5000, 4), (64, 256, 256)])
def test_matches_brute_force(backend, n, k, d):
    g = torch.Generator().manual_seed(n * 7919 + k)
    z, book = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx = search(z, book, backend)
    assert_as_near(z, book, idx)
    assert torch.equal(idx, float64_argmin(z, book))


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_from_origin(backend):
    """Large norms stress the expansion; the chosen code must still be a nearest one."""
    g = torch.Generator().manual_seed(3)
    book = torch.randn(300, 16, generator=g) + 50.0
    z = torch.randn(700, 16, generator=g) + 50.0
    assert torch.equal(search(z, book, backend), float64_argmin(z, book))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d", [(300, 70, 6), (1030, 4100, 3)])
def test_exact_ties_pick_first_index(backend, n, k, d):
    z, book = integer_data(n, k, d)
    book[k // 2:] = book[: k - k // 2].clone()            # every code appears twice
    expect = brute_sq_dist(z, book).argmin(1)              # exact, first minimum
    assert torch.equal(search(z, book, backend), expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 3, 64, 511, 512, 1000, 5000])
def test_chunked_equals_unchunked(backend, chunk_rows):
    z, book = integer_data(1037, 4133, 5, seed=1)
    whole = search(z, book, backend, chunk_rows=z.shape[0])
    assert torch.equal(whole, brute_sq_dist(z, book).argmin(1))
    assert torch.equal(search(z, book, backend, chunk_rows=chunk_rows), whole)


@pytest.mark.parametrize("chunk_rows", [0, 7, 129])
def test_chunked_random_data_as_near(chunk_rows):
    g = torch.Generator().manual_seed(5)
    z, book = torch.randn(777, 32, generator=g), torch.randn(999, 32, generator=g)
    assert torch.equal(nearest_codes(z, book, chunk_rows=chunk_rows), float64_argmin(z, book))


@pytest.mark.parametrize("tile_cols", [1000, 4096, None])
def test_column_tiles_across_codebook(monkeypatch, tile_cols):
    """The native back end splits a large codebook into column tiles; the running minimum
    must carry across tiles (nearest codes planted at the start, tile edges and end)."""
    if tile_cols:
        monkeypatch.setattr(nm, "_NATIVE_TILE_BYTES", 4 * nm._NATIVE_ROWS * tile_cols)
    z, book = integer_data(700, 9000, 3, seed=2)
    book = book * 10 + 100                                 # all codes far from z ...
    planted = [0, 999, 1000, 4095, 4096, 8999, 5000]
    for i, j in enumerate(planted):
        book[j] = z[i]                                     # ... except these exact hits
    idx = search(z, book, "native")
    assert idx[: len(planted)].tolist() == planted
    assert torch.equal(idx, brute_sq_dist(z, book).argmin(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_under_bf16_autocast(backend):
    g = torch.Generator().manual_seed(6)
    z, book = torch.randn(500, 64, generator=g), torch.randn(512, 64, generator=g)
    expect = search(z, book, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fp32 input: the GEMM must not run in bf16 (that would change many indices)
        assert torch.equal(search(z, book, backend), expect)
        # bf16 input is upcast: same as searching its fp32 value
        zb = z.bfloat16()
        assert torch.equal(search(zb, book, backend),
                           search(zb.float(), book, backend))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(search(z, book.bfloat16(), backend),
                           search(z, book.bfloat16().float(), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    out = search(torch.empty(0, 8), torch.randn(4, 8), backend)
    assert out.shape == (0,) and out.dtype == torch.int64


def test_non_contiguous_input():
    z, book = integer_data(200, 50, 6, seed=3)
    zt = z.t().contiguous().t()                            # same values, column-major
    assert torch.equal(nearest_codes(zt, book[::1]), brute_sq_dist(z, book).argmin(1))
    assert torch.equal(nearest_codes(z[::2], book), brute_sq_dist(z[::2], book).argmin(1))


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match=r"z \(3, 5\) and codebook \(4, 6\) must be \(N, D\) and \(K, D\)"):
        nearest_codes(torch.randn(3, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"z \(5,\)"):
        nearest_codes(torch.randn(5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="codebook is empty"):
        nearest_codes(torch.randn(3, 5), torch.randn(0, 5))
    with pytest.raises(ValueError, match="chunk_rows = -1"):
        nearest_codes(torch.randn(3, 5), torch.randn(4, 5), chunk_rows=-1)
    with pytest.raises(ValueError, match="backend 'gpu'"):
        nearest_codes(torch.randn(3, 5), torch.randn(4, 5), backend="gpu")


def test_native_kernel_builds_here():
    """The fast path must exist on the supported platform (CPU, a C compiler, cffi), or the
    performance target silently degrades to the torch path."""
    assert nm.native_kernel() is not None, nm._native_error


@pytest.mark.parametrize("n,chunk_rows", [(3, 0), (9, 1), (9, 5), (9, 300)])
def test_more_threads_than_row_blocks(n, chunk_rows):
    """Blocks of 1 to 9 rows, wide enough (rows x K >= 65536) that the C pass opens its OpenMP
    region, with more threads than rows."""
    z, book = integer_data(n, 70000, 4, seed=8)
    expect = brute_sq_dist(z, book).argmin(1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert torch.equal(search(z, book, "native", chunk_rows=chunk_rows), expect)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
def test_native_and_torch_back_ends_agree(seed):
    """Identical indices on random data and on near-ties, through both back ends."""
    g = torch.Generator().manual_seed(seed)
    z, book = torch.randn(3000, 32, generator=g), torch.randn(1000, 32, generator=g)
    assert torch.equal(search(z, book, "native"), search(z, book, "torch"))
    z, book = near_tie_problem(seed=seed, d=32, k=256)
    native = search(z, book, "native")
    assert torch.equal(native, search(z, book, "torch"))
    assert torch.equal(native, float64_argmin(z, book))


def test_deterministic_and_thread_safe():
    g = torch.Generator().manual_seed(7)
    book = torch.randn(2048, 32, generator=g)
    inputs = [torch.randn(3000 + 17 * i, 32, generator=g) for i in range(4)]
    expect = [nearest_codes(z, book) for z in inputs]
    assert all(torch.equal(nearest_codes(z, book), e) for z, e in zip(inputs, expect))
    got = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            got[i] = nearest_codes(inputs[i], book)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g_, e) for g_, e in zip(got, expect))


# ---- fallbacks: each forced explicitly, on a fresh kernel state ----------------------------------
@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """Forget the loaded kernel and build into an empty private cache dir."""
    monkeypatch.setattr(nm, "_tried", False)
    monkeypatch.setattr(nm, "_native", None)
    monkeypatch.setattr(nm, "_native_error", None)
    monkeypatch.setenv("VQTOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(nm, "_private_tmp", lambda: tmp_path / "private")
    return monkeypatch


def _check_fallback_works():
    z, book = integer_data(300, 77, 5, seed=4)
    assert torch.equal(nearest_codes(z, book), brute_sq_dist(z, book).argmin(1))  # auto -> torch
    z, book = near_tie_problem(seed=3)
    assert torch.equal(nearest_codes(z, book), float64_argmin(z, book))
    with pytest.raises(RuntimeError, match="native CPU kernel is unavailable"):
        nearest_codes(z, book, backend="native")


def test_fallback_when_disabled_by_env(fresh_kernel, tmp_path):
    fresh_kernel.setenv("VQTOK_NEAREST_BACKEND", "torch")
    assert nm.native_kernel() is None and "VQTOK_NEAREST_BACKEND" in nm._native_error
    assert not (tmp_path / "cache").exists()               # nothing built, no child started
    _check_fallback_works()


@pytest.mark.parametrize("cc", ["false", "/nonexistent/cc"])
def test_fallback_when_the_compiler_fails(fresh_kernel, tmp_path, cc):
    """A compiler that fails, or none at all (cffi runs $CC through setuptools): one warning,
    the torch back end, and no half-built file left in the cache."""
    fresh_kernel.setenv("CC", cc)
    with pytest.warns(RuntimeWarning, match="kernel unavailable.*did not build"):
        assert nm.native_kernel() is None
    assert "CompileError" in nm._native_error
    assert not list((tmp_path / "cache").iterdir())
    _check_fallback_works()


def test_fallback_without_cffi(fresh_kernel):
    fresh_kernel.setitem(sys.modules, "cffi", None)        # `import cffi` raises ImportError
    with pytest.warns(RuntimeWarning, match="native nearest-code kernel unavailable.*cffi"):
        assert nm.native_kernel() is None
    _check_fallback_works()


def test_fallback_without_setuptools_or_distutils(fresh_kernel, tmp_path):
    """As on Python >= 3.12 without setuptools: cffi's compile cannot run in the child."""
    fake = tmp_path / "fake_site"
    for name in ("setuptools", "distutils"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    fresh_kernel.setenv("PYTHONPATH", str(fake))
    with pytest.warns(RuntimeWarning, match="kernel unavailable.*did not build"):
        assert nm.native_kernel() is None
    assert "distutils" in nm._native_error or "setuptools" in nm._native_error
    _check_fallback_works()


def test_fallback_when_kernel_is_wrong(fresh_kernel, tmp_path):
    """A kernel that compiles but computes the wrong thing is caught by the self-check (in the
    child), is never marked as checked, and is never loaded here."""
    fresh_kernel.setattr(nm, "_C_SOURCE", nm._C_SOURCE.replace("if (v < bv)", "if (v > bv)"))
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        assert nm.native_kernel() is None
    assert not list((tmp_path / "cache").glob("*.ok"))
    _check_fallback_works()


def _mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def test_a_crash_in_the_child_check_falls_back_without_harm(fresh_kernel, tmp_path):
    """A kernel whose entry point segfaults (as a miscompiled or mismatched one could) kills the
    child that checks it, never this process: one warning, the torch back end with identical
    codes, nothing marked as checked, and the crashing module never loaded here."""
    crash = nm._C_SOURCE.replace("if (nthreads < 1) nthreads = 1;",
                                 "if (nthreads < 1) nthreads = 1;\n    *(volatile int *)0 = 0;")
    assert crash != nm._C_SOURCE
    fresh_kernel.setattr(nm, "_C_SOURCE", crash)
    with pytest.warns(RuntimeWarning, match="child process failed: killed by SIG"):
        assert nm.native_kernel() is None
    built = list((tmp_path / "cache").glob("_vqtok_nearest_*"))
    assert len(built) == 1                                 # it did build ...
    assert not list((tmp_path / "cache").glob("*.ok"))     # ... but is not marked as checked
    assert str(built[0]) not in _mapped_files()            # ... and was never loaded here
    _check_fallback_works()
    # the next process (here: a fresh state) checks it again in a child, and falls back again
    fresh_kernel.setattr(nm, "_tried", False)
    with pytest.warns(RuntimeWarning, match="killed by SIG"):
        assert nm.native_kernel() is None


def _count_children(monkeypatch):
    runs = []
    real_run = nm.subprocess.run

    def counting(*args, **kw):
        if nm._CHILD in args[0]:
            runs.append(args[0])
        return real_run(*args, **kw)
    monkeypatch.setattr(nm.subprocess, "run", counting)
    return runs


def test_fresh_build_check_once_and_cache_reuse(fresh_kernel, tmp_path):
    """Built through cffi with the preferred flags (-march=native, OpenMP), checked in ONE child
    process, published as one module + one marker; a later load (another process) neither
    rebuilds nor starts a child."""
    children = _count_children(fresh_kernel)
    kernel = nm.native_kernel()
    assert kernel is not None, nm._native_error
    assert len(children) == 1
    cache = tmp_path / "cache"
    preferred = nm._module_name(nm._C_SOURCE, nm._flag_sets()[0])
    assert "-march=native" in nm._flag_sets()[0] and "-fopenmp" in nm._flag_sets()[0]
    module = cache / f"{preferred}{nm._ext_suffix()}"
    assert sorted(p.name for p in cache.iterdir()) == sorted([module.name,
                                                              nm._checked_marker(module).name])
    assert str(module) in _mapped_files()                  # this module is the one loaded here
    stamp = module.stat().st_mtime_ns
    fresh_kernel.setattr(nm, "_tried", False)
    fresh_kernel.setattr(nm, "_native", None)
    assert nm.native_kernel() is not None
    assert len(children) == 1                              # checked once: no second child
    assert module.stat().st_mtime_ns == stamp              # loaded from the cache, not rebuilt
    z, book = integer_data(123, 45, 3, seed=5)
    assert torch.equal(nearest_codes(z, book, backend="native"), brute_sq_dist(z, book).argmin(1))


def test_a_module_without_marker_is_checked_again(fresh_kernel, tmp_path):
    """A built module whose check never finished (no marker) is checked in a child again, not
    trusted; the marker is per torch build."""
    assert nm.native_kernel() is not None, nm._native_error
    (marker,) = (tmp_path / "cache").glob("*.ok")
    marker.unlink()
    children = _count_children(fresh_kernel)
    fresh_kernel.setattr(nm, "_tried", False)
    fresh_kernel.setattr(nm, "_native", None)
    assert nm.native_kernel() is not None
    assert len(children) == 1 and marker.exists()


_RACE = """
import warnings, torch
warnings.simplefilter("error")
from tokenizer import nearest as nm
assert nm.native_kernel() is not None, nm._native_error
z, book = torch.randn(200, 8), torch.randn(300, 8)
native = nm.nearest_codes(z, book, backend="native")
assert torch.equal(native, nm.nearest_codes(z, book, backend="torch"))
"""


def test_concurrent_first_builds_race_safely(tmp_path):
    """Two processes building into the same empty cache at once both get a working kernel
    (each child builds in its own directory and publishes with an atomic rename)."""
    env = {**os.environ, "VQTOK_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    env.pop("VQTOK_NEAREST_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, "-c", _RACE], cwd=nm.Path(nm.__file__).parent.parent,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    cache = tmp_path / "cache"
    assert len(list(cache.glob(f"_vqtok_nearest_*{nm._ext_suffix()}"))) == 1
    assert not list(cache.glob(".build-*")) and not list(cache.glob(".tmp-*"))


# ---- exactness on near-ties, independence of the batch -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [16, 64])
def test_near_ties_get_the_float64_argmin(monkeypatch, backend, d):
    z, book = near_tie_problem(d=d)
    expect = float64_argmin(z, book)
    redecided = []
    real = nm._search

    def spy(*args):
        idx, count = real(*args)
        redecided.append(count)
        return idx, count
    monkeypatch.setattr(nm, "_search", spy)
    got = search(z, book, backend)
    assert sum(redecided) >= 20                     # the near-tie rows took the float64 path
    assert torch.equal(got, expect)
    plain = search(z, book, backend, exact=False)   # fp32 alone cannot order them
    assert (plain != expect).sum() >= 3
    assert got[6] == 3 and got[7] == 3              # on a duplicated code: the lower index
    assert got[0] == 3                              # the midpoint of a duplicate pair


@pytest.mark.parametrize("backend", ["torch_numpy", "torch_accelerator_path"])
def test_best_two_back_ends_of_the_torch_path(monkeypatch, backend):
    """The torch back end's best-two on accelerators (torch.min) gives the same as numpy's."""
    if backend == "torch_accelerator_path":
        monkeypatch.setattr(nm, "best_two", nm._best_two_torch)
    z, book = near_tie_problem(seed=2)
    assert torch.equal(nearest_codes(z, book, backend="torch"), float64_argmin(z, book))


def test_best_two_agree_on_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300, 40), generator=g).float()    # many exact ties
    a = nm._best_two_numpy(scores.clone())
    b = nm._best_two_torch(scores.clone())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[0], torch.from_numpy(scores.numpy().argmin(axis=1)))   # first minimum
    assert torch.equal(a[2], scores.topk(2, dim=1, largest=False).values[:, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_independent_of_batch_size_position_and_threads(backend):
    z, book = near_tie_problem(seed=1, d=32, k=512)
    z = torch.cat([z, z[:37] * (1 + 2 ** -23)])
    full = search(z, book, backend)
    assert torch.equal(full, float64_argmin(z, book))
    for size in (1, 7, 256):
        parts = torch.cat([search(z[i:i + size], book, backend) for i in range(0, z.shape[0], size)])
        assert torch.equal(parts, full), size
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(search(z[order], book, backend), full[order])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(search(z, book, backend), full)
    finally:
        torch.set_num_threads(threads)


def test_error_margin_covers_the_computed_scores():
    """The bound behind the re-decision, checked on the worst case of the expansion (codes and
    queries far from the origin, so the scores are large differences): every fp32 score of the
    torch path is within E = margin / 2 of its float64 value."""
    g = torch.Generator().manual_seed(11)
    for d in (4, 32, 256):
        book = torch.randn(300, d, generator=g) * 3 + 40.0
        z = torch.randn(500, d, generator=g) * 3 + 40.0
        scores = torch.addmm(book.pow(2).sum(1), z, book.t(), beta=1.0, alpha=-2.0).double()
        exact = book.double().pow(2).sum(1) - 2 * z.double() @ book.double().t()
        scale = z.double().pow(2).sum(1, keepdim=True) + book.double().pow(2).sum(1).max()
        assert torch.all((scores - exact).abs() <= nm.error_margin(d) / 2 * scale)


def test_untouched_fp32_winners_are_certain():
    """exact=False and exact=True agree wherever the fp32 gap is beyond the margin."""
    g = torch.Generator().manual_seed(12)
    z, book = torch.randn(4000, 32, generator=g), torch.randn(512, 32, generator=g)
    assert torch.equal(nearest_codes(z, book, exact=False), nearest_codes(z, book))


# ---- the quantiser searches through nearest_codes ----------------------------------------------
def test_quantizer_search_follows_codebook_changes():
    """The eval-mode cache of the searched (normalised) codebook is dropped on any change."""
    from tokenizer import QuantizerConfig, VectorQuantizer
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(codebook_size=64, l2_normalize=True, kmeans_init=False), 16).eval()
    z = torch.randn(500, 16)

    def expect():
        book = torch.nn.functional.normalize(q.codebook.detach(), dim=-1)
        return float64_argmin(torch.nn.functional.normalize(z, dim=-1), book)
    assert torch.equal(q.nearest(z), expect())
    q._set_codebook(torch.randn(64, 16))                       # in place, as the EMA update
    assert torch.equal(q.nearest(z), expect())
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["codebook"] = torch.randn(64, 16)
    q.load_state_dict(state)
    assert torch.equal(q.nearest(z), expect())
    with torch.inference_mode():
        inside = q.nearest(z)
    assert torch.equal(inside, expect())
    q.train()
    _, idx, _ = q(z)                                           # training forward: no cache
    q.eval()
    assert torch.equal(q.nearest(z), expect())
