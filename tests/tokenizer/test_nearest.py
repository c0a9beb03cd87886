"""nearest_codes: the float64 argmin (ties -> lowest index), also on near-ties fp32 cannot
order; independent of batch size, position and threads; chunking, autocast."""
from __future__ import annotations

import threading

import pytest
import torch

from tokenizer import nearest as nm
from tokenizer.nearest import nearest_codes


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


@pytest.mark.parametrize("n,k,d", [(1, 2, 3), (1, 1, 4), (5, 2, 1), (37, 33, 5), (1000, 100, 64),
                                   (513, 4099, 7), (600, 5000, 4), (64, 256, 256)])
def test_matches_brute_force(n, k, d):
    g = torch.Generator().manual_seed(n * 7919 + k)
    z, book = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    idx = nearest_codes(z, book)
    assert_as_near(z, book, idx)
    assert torch.equal(idx, float64_argmin(z, book))


def test_far_from_origin():
    """Large norms stress the expansion; the chosen code must still be a nearest one."""
    g = torch.Generator().manual_seed(3)
    book = torch.randn(300, 16, generator=g) + 50.0
    z = torch.randn(700, 16, generator=g) + 50.0
    assert torch.equal(nearest_codes(z, book), float64_argmin(z, book))


@pytest.mark.parametrize("n,k,d", [(300, 70, 6), (1030, 4100, 3)])
def test_exact_ties_pick_first_index(n, k, d):
    z, book = integer_data(n, k, d)
    book[k // 2:] = book[: k - k // 2].clone()            # every code appears twice
    expect = brute_sq_dist(z, book).argmin(1)              # exact, first minimum
    assert torch.equal(nearest_codes(z, book), expect)


@pytest.mark.parametrize("chunk_rows", [1, 3, 64, 511, 512, 1000, 5000])
def test_chunked_equals_unchunked(chunk_rows):
    z, book = integer_data(1037, 4133, 5, seed=1)
    whole = nearest_codes(z, book, chunk_rows=z.shape[0])
    assert torch.equal(whole, brute_sq_dist(z, book).argmin(1))
    assert torch.equal(nearest_codes(z, book, chunk_rows=chunk_rows), whole)


@pytest.mark.parametrize("chunk_rows", [0, 7, 129])
def test_chunked_random_data_as_near(chunk_rows):
    g = torch.Generator().manual_seed(5)
    z, book = torch.randn(777, 32, generator=g), torch.randn(999, 32, generator=g)
    assert torch.equal(nearest_codes(z, book, chunk_rows=chunk_rows), float64_argmin(z, book))


def test_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(6)
    z, book = torch.randn(500, 64, generator=g), torch.randn(512, 64, generator=g)
    expect = nearest_codes(z, book)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fp32 input: the GEMM must not run in bf16 (that would change many indices)
        assert torch.equal(nearest_codes(z, book), expect)
        # bf16 input is upcast: same as searching its fp32 value
        zb = z.bfloat16()
        assert torch.equal(nearest_codes(zb, book), nearest_codes(zb.float(), book))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(nearest_codes(z, book.bfloat16()),
                           nearest_codes(z, book.bfloat16().float()))


def test_empty_input():
    out = nearest_codes(torch.empty(0, 8), torch.randn(4, 8))
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


# ---- exactness on near-ties, independence of the batch -------------------------------------------
@pytest.mark.parametrize("d", [16, 64])
def test_near_ties_get_the_float64_argmin(monkeypatch, d):
    z, book = near_tie_problem(d=d)
    expect = float64_argmin(z, book)
    redecided = []
    real = nm._search

    def spy(*args):
        idx, count = real(*args)
        redecided.append(count)
        return idx, count
    monkeypatch.setattr(nm, "_search", spy)
    got = nearest_codes(z, book)
    assert sum(redecided) >= 20                     # the near-tie rows took the float64 path
    assert torch.equal(got, expect)
    plain = nearest_codes(z, book, exact=False)     # fp32 alone cannot order them
    assert (plain != expect).sum() >= 3
    assert got[6] == 3 and got[7] == 3              # on a duplicated code: the lower index
    assert got[0] == 3                              # the midpoint of a duplicate pair


@pytest.mark.parametrize("best_two", ["numpy (CPU)", "torch.min (accelerators)"])
def test_best_two_on_cpu_and_accelerators(monkeypatch, best_two):
    """The best-two of accelerators (torch.min) gives the same codes as the CPU's (numpy)."""
    if best_two == "torch.min (accelerators)":
        monkeypatch.setattr(nm, "best_two", nm._best_two_torch)
    z, book = near_tie_problem(seed=2)
    assert torch.equal(nearest_codes(z, book), float64_argmin(z, book))


def test_best_two_agree_on_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300, 40), generator=g).float()    # many exact ties
    a = nm._best_two_numpy(scores.clone())
    b = nm._best_two_torch(scores.clone())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[0], torch.from_numpy(scores.numpy().argmin(axis=1)))   # first minimum
    assert torch.equal(a[2], scores.topk(2, dim=1, largest=False).values[:, 1])


def test_independent_of_batch_size_position_and_threads():
    z, book = near_tie_problem(seed=1, d=32, k=512)
    z = torch.cat([z, z[:37] * (1 + 2 ** -23)])
    full = nearest_codes(z, book)
    assert torch.equal(full, float64_argmin(z, book))
    for size in (1, 7, 256):
        parts = torch.cat([nearest_codes(z[i:i + size], book) for i in range(0, z.shape[0], size)])
        assert torch.equal(parts, full), size
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(nearest_codes(z[order], book), full[order])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(nearest_codes(z, book), full)
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


def test_fp32_only_is_the_first_minimum_of_the_fp32_scores():
    """exact=False (k-means' assignment) is the argmin of the fp32 scores, first index on ties,
    on CPU (numpy) and as torch.argmin computes it on accelerators."""
    z, book = integer_data(700, 300, 6, seed=3)                      # many exact ties
    scores = torch.addmm(book.pow(2).sum(1), z, book.t(), beta=1.0, alpha=-2.0)
    expect = scores.argmin(dim=1)
    assert torch.equal(nearest_codes(z, book, exact=False), expect)
    assert torch.equal(nearest_codes(z, book, chunk_rows=7, exact=False), expect)
    assert torch.equal(nm.argmin_rows(scores.clone()), expect)
    tied = (scores == scores.min(1, keepdim=True).values).sum(1) > 1
    assert tied.sum() >= 50                                           # the rule was exercised


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
