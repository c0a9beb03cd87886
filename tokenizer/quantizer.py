"""Vector quantiser (van den Oord et al. 2017) with EMA codebook, dead-code restart, k-means init,
cosine codes and a low-dimensional code projection.

Every codebook statistic that must agree across data-parallel replicas (EMA counts and sums,
k-means sums, restart candidates, usage counts) goes through `all_reduce_fn`, an injected
in-place SUM over replicas. It is a no-op by default, so this module imports nothing distributed.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantizerConfig
from .nearest import nearest_codes

AllReduceFn = Callable[[torch.Tensor], None]


def _noop_all_reduce(tensor: torch.Tensor) -> None:
    return None


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int = 512, dim: int = 64, *, codebook_dim: int | None = None,
                 beta: float = 0.25, ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 1.0, kmeans_init: bool = True, kmeans_iters: int = 10,
                 l2_normalize: bool = False, chunk_size: int = 0,
                 all_reduce_fn: AllReduceFn | None = None):
        super().__init__()
        self.config = QuantizerConfig(
            codebook_size=codebook_size, codebook_dim=codebook_dim, beta=beta, ema=ema, decay=decay,
            eps=eps, dead_code_threshold=dead_code_threshold, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, l2_normalize=l2_normalize, chunk_size=chunk_size)
        if dim < 1:
            raise ValueError(f"VectorQuantizer: dim = {dim} must be >= 1")
        self.codebook_size = codebook_size
        self.dim = dim
        self.code_dim = codebook_dim or dim
        self.all_reduce_fn: AllReduceFn = all_reduce_fn or _noop_all_reduce
        project = self.code_dim != dim
        self.in_proj = nn.Linear(dim, self.code_dim) if project else nn.Identity()
        self.out_proj = nn.Linear(self.code_dim, dim) if project else nn.Identity()

        init = torch.randn(codebook_size, self.code_dim)
        if l2_normalize:
            init = F.normalize(init, dim=-1)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # 1 once k-means init ran (or was not asked for); saved with the weights
        self.register_buffer("initialized", torch.tensor(0 if kmeans_init else 1, dtype=torch.uint8))
        self.metrics: dict[str, torch.Tensor] = {}
        self._search_cache: tuple | None = None   # (key, codebook as searched), eval mode only
        self._leader: bool | None = None

    @classmethod
    def from_config(cls, config: QuantizerConfig, dim: int, **kw) -> "VectorQuantizer":
        return cls(config.codebook_size, dim, codebook_dim=config.codebook_dim, beta=config.beta,
                   ema=config.ema, decay=config.decay, eps=config.eps,
                   dead_code_threshold=config.dead_code_threshold, kmeans_init=config.kmeans_init,
                   kmeans_iters=config.kmeans_iters, l2_normalize=config.l2_normalize,
                   chunk_size=config.chunk_size, **kw)

    # ---- search -------------------------------------------------------------------------------
    # search_vectors and search_codebook are the space `nearest` searches in
    def search_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (N, code_dim) fp32: projected, and normalised when cosine codes are on."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.in_proj(z.reshape(-1, self.dim).float())
        return F.normalize(flat, dim=-1) if self.config.l2_normalize else flat

    def search_codebook(self) -> torch.Tensor:
        """(K, code_dim) fp32 codebook as searched (normalised when cosine codes are on). In eval
        mode kept until the codebook changes (same tensor, storage and version counter, or a
        write through _set_codebook), so encoding does not renormalise it per micro-batch."""
        if self.training:
            return self._search_codebook()
        book = self.codebook
        key = (id(book), book.data_ptr(), book._version, book.device, book.dtype,
               torch.is_inference_mode_enabled())
        if self._search_cache is None or self._search_cache[0] != key:
            self._search_cache = (key, self._search_codebook())
        return self._search_cache[1]

    def _search_codebook(self) -> torch.Tensor:
        book = self.codebook.detach().float()
        return F.normalize(book, dim=-1) if self.config.l2_normalize else book

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., dim) -> (...) int64, the float64 argmin of squared L2 in the search space
        (cosine when l2-normalised), ties -> lowest index, independent of the batch (see
        tokenizer/nearest.py)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"nearest: last dim of z is {z.shape[-1]}, the quantiser expects {self.dim}")
        flat = self.search_vectors(z)
        idx = nearest_codes(flat, self.search_codebook(), self.config.chunk_size)
        return idx.reshape(z.shape[:-1])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., dim) quantised vectors."""
        codes = F.embedding(idx, self.search_codebook() if self.config.ema else self._codebook_for_grad())
        return self.out_proj(codes)

    def _codebook_for_grad(self) -> torch.Tensor:
        book = self.codebook.float()
        return F.normalize(book, dim=-1) if self.config.l2_normalize else book

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        """z: (..., dim) -> (z_q straight-through (..., dim), idx (...), losses dict)."""
        lead_shape = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.search_vectors(z)                              # (N, d) fp32
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            idx = nearest_codes(flat.detach(), self.search_codebook(), self.config.chunk_size)
            losses = {}
            if self.config.ema:
                quantized = F.embedding(idx, self.search_codebook())   # no grad into codebook
                if self.training:
                    self._ema_update(flat.detach(), idx)
            else:
                quantized = F.embedding(idx, self._codebook_for_grad())
                # codebook term: ||sg[z_e] - e||^2 moves the codes towards the encoder outputs
                losses["codebook"] = F.mse_loss(quantized, flat.detach())
            # commitment term: beta * ||z_e - sg[e]||^2 keeps the encoder near its code
            losses["commitment"] = self.config.beta * F.mse_loss(flat, quantized.detach())
            # straight-through: forward value is e, gradient flows to z_e unchanged
            st = flat + (quantized - flat).detach()
            z_q = self.out_proj(st)
            self._record_usage(idx)
        return z_q.reshape(*lead_shape, self.dim).to(z.dtype), idx.reshape(lead_shape), losses

    # ---- codebook statistics (all through all_reduce_fn) ---------------------------------------
    def _world_size(self, ref: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, device=ref.device)
        self.all_reduce_fn(ones)
        return ones

    @torch.no_grad()
    def _is_leader(self, ref: torch.Tensor) -> bool:
        """Elect one replica using only the sum hook; cached. Each replica draws from the torch
        RNG, so a run whose replicas are seeded differently (as `vqtok train` seeds its ranks)
        elects the same one every time; replicas seeded alike tie, and a private random draw
        from the OS decides instead."""
        if self._leader is None:
            if self.all_reduce_fn is _noop_all_reduce:
                self._leader = True
            else:
                leader = self._elect(torch.rand((), dtype=torch.float64).item(), ref)
                if leader is None:
                    leader = self._elect(int.from_bytes(os.urandom(6), "little") / 2.0**48, ref)
                self._leader = bool(leader)
        return self._leader

    def _elect(self, mine: float, ref: torch.Tensor) -> bool | None:
        """True on the one replica with the largest `mine`, False on the others, None on all if
        the largest is tied: a bisection over all-reduced counts of 'mine > t'. Every replica
        sees the same counts, so all take the same number of collective calls."""
        low, high = 0.0, 1.0
        for _ in range(64):
            mid = (low + high) / 2
            above = torch.tensor([float(mine > mid)], device=ref.device)
            self.all_reduce_fn(above)
            if above.item() >= 1:
                low = mid
            else:
                high = mid
            count = torch.tensor([float(mine > low)], device=ref.device)
            self.all_reduce_fn(count)
            if count.item() == 1:
                return mine > low
        return None

    def _from_leader(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every replica gets the leader's `tensor` (a broadcast built from the sum hook)."""
        out = tensor * float(self._is_leader(tensor))
        self.all_reduce_fn(out)
        return out

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means on the first batch; sums and counts are all-reduced every iteration so
        that all replicas end with the same centroids."""
        k = self.codebook_size
        centroids = self._from_leader(_kmeans_plus_plus(flat, k))
        for _ in range(self.config.kmeans_iters):
            # k-means only needs a good assignment: the fp32 argmin, no near-tie re-decision
            idx = nearest_codes(flat, centroids, self.config.chunk_size, exact=False)
            sums = torch.zeros_like(centroids).index_add_(0, idx, flat)
            counts = torch.bincount(idx, minlength=k).float()
            self.all_reduce_fn(sums)
            self.all_reduce_fn(counts)
            hit = counts > 0
            centroids[hit] = sums[hit] / counts[hit, None]
            if self.config.l2_normalize:
                centroids = F.normalize(centroids, dim=-1)
        self._set_codebook(centroids)
        if self.config.ema:
            # EMA statistics are global (summed over replicas) batch counts; start them where
            # k-means ended so that e = sum / count holds from the first step
            self.ema_count.copy_(counts)
            self.ema_sum.copy_(centroids * counts[:, None])
        self.initialized.fill_(1)

    def _set_codebook(self, values: torch.Tensor) -> None:
        self.codebook.data.copy_(values.to(self.codebook.dtype))
        self._search_cache = None     # .data writes do not bump the version counter

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """Paper appendix: N_i <- g N_i + (1-g) n_i ; m_i <- g m_i + (1-g) sum z ; e_i = m_i / N~_i
        with Laplace-smoothed N~_i = (N_i + eps) / (sum N + K eps) * sum N."""
        k, decay, eps = self.codebook_size, self.config.decay, self.config.eps
        counts = torch.bincount(idx, minlength=k).float()                        # (K,)
        sums = torch.zeros(k, self.code_dim, device=flat.device).index_add_(0, idx, flat)
        self.all_reduce_fn(counts)
        self.all_reduce_fn(sums)
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + eps) / (total + k * eps) * total
        book = self.ema_sum / smoothed[:, None]
        if self.config.l2_normalize:
            book = F.normalize(book, dim=-1)
        self._set_codebook(book)
        if self.config.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Codes whose EMA count fell below the threshold are re-seeded from random encoder
        outputs of this batch, taken from one replica so that every replica restarts identically."""
        dead = self.ema_count < self.config.dead_code_threshold                # (K,) same on all ranks
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        rows = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        candidates = self._from_leader(flat[rows])
        if self.config.l2_normalize:
            candidates = F.normalize(candidates, dim=-1)
        book = self.codebook.data.clone()
        book[dead] = candidates.to(book.dtype)
        self._set_codebook(book)
        self.ema_sum[dead] = candidates
        self.ema_count[dead] = 1.0
        self.metrics["restarted"] = torch.tensor(float(num_dead))

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx.reshape(-1), minlength=self.codebook_size).float()
        if self.training:  # eval may run on one rank alone: a collective there would hang
            self.all_reduce_fn(counts)
        probs = counts / counts.sum().clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        self.metrics["usage"] = (counts > 0).float().mean()
        self.metrics["perplexity"] = entropy.exp()


def _kmeans_plus_plus(flat: torch.Tensor, k: int, max_work: float = 4e8) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling); plain random rows when K x N is too large to be cheap."""
    n = flat.shape[0]
    if n == 0:
        raise ValueError("k-means init needs at least one encoder output")
    if k * n > max_work:
        return flat[torch.randint(0, n, (k,), device=flat.device)].clone()
    centroids = torch.empty(k, flat.shape[1], device=flat.device)
    centroids[0] = flat[torch.randint(0, n, (1,), device=flat.device)]
    closest = (flat - centroids[0]).pow(2).sum(1)                     # (N,)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than codes: duplicate rows
            pick = torch.randint(0, n, (1,), device=flat.device)
        else:
            pick = torch.multinomial(closest / total, 1)
        centroids[i] = flat[pick]
        closest = torch.minimum(closest, (flat - centroids[i]).pow(2).sum(1))
    return centroids
