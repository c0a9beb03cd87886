"""stable_nearest: the float64 argmin (ties -> lowest index) also on near-ties that fp32 cannot
order, through both best-two back ends (numpy on CPU, torch elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.tokenize import encoder as enc_mod
from pipelines.tokenize.encoder import stable_nearest


def float64_argmin(z: torch.Tensor, book: torch.Tensor) -> np.ndarray:
    """Brute force on the same fp32 inputs: float64 squared distances, first index on ties."""
    dist = ((z.double()[:, None, :] - book.double()[None]) ** 2).sum(-1)
    return dist.numpy().argmin(axis=1)


def near_tie_problem(seed: int = 0):
    """A codebook with an exact duplicate and codes one fp32 ulp apart, and queries on, between
    and near those codes: rows fp32 scores cannot order."""
    g = torch.Generator().manual_seed(seed)
    d, k = 16, 64
    book = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    book[10] = book[3]                                               # exact tie: 3 must win
    book[20] = book[5]
    book[20, 0] = torch.nextafter(book[5, 0], torch.tensor(2.0))     # one ulp apart
    book[30] = book[7] * (1 + 2 ** -22)                              # a few ulp apart
    mids = [(book[a] + book[b]) / 2 for a, b in ((3, 10), (5, 20), (7, 30), (1, 2), (4, 9))]
    on = book[[3, 10, 5, 20, 7, 30, 0, 63]]
    noisy = book[torch.randint(0, k, (200,), generator=g)] + 1e-3 * torch.randn(200, d, generator=g)
    z = torch.cat([torch.stack(mids), on, noisy, torch.randn(100, d, generator=g)]).float()
    return z, book.float()


@pytest.mark.parametrize("back_end", ["numpy", "torch"])
def test_stable_nearest_is_the_float64_argmin_on_near_ties(monkeypatch, back_end):
    z, book = near_tie_problem()
    if back_end == "torch":   # the accelerator path, run on the CPU
        monkeypatch.setattr(enc_mod, "best_two", enc_mod._best_two_torch)
    rechecked = []
    exact = enc_mod.exact_among_candidates

    def spy(zs, *args):
        rechecked.append(zs.shape[0])
        return exact(zs, *args)

    monkeypatch.setattr(enc_mod, "exact_among_candidates", spy)
    got = stable_nearest(z, book).numpy()
    plain = torch.addmm(book.pow(2).sum(1), z, book.t(), beta=1, alpha=-2).argmin(1).numpy()
    assert (plain != float64_argmin(z, book)).sum() >= 3   # fp32 alone gets some rows wrong
    assert sum(rechecked) >= 8                      # the near-tie rows really took the float64 path
    np.testing.assert_array_equal(got, float64_argmin(z, book))
    assert got[5] == 3 and got[6] == 3              # the duplicate pair resolves to the lower index


def test_stable_nearest_does_not_depend_on_row_position():
    z, book = near_tie_problem(seed=1)
    full = stable_nearest(z, book)
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(stable_nearest(z[order], book), full[order])
    parts = torch.cat([stable_nearest(z[i:i + 7], book) for i in range(0, z.shape[0], 7)])
    assert torch.equal(parts, full)


def test_best_two_back_ends_agree_on_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300, 40), generator=g).float()    # many exact ties
    a = enc_mod._best_two_numpy(scores.clone())
    b = enc_mod._best_two_torch(scores.clone())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    arg = a[0]
    assert torch.equal(arg, torch.from_numpy(scores.numpy().argmin(axis=1)))   # first minimum
