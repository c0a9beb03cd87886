"""Vector quantiser (van den Oord et al. 2017) with EMA codebook, dead-code restart, k-means init,
cosine codes, a low-dimensional code projection and SimVQ's linearly mapped frozen codebook.

Data-parallel replicas stay bitwise identical through one injected `Collectives` object (a no-op
by default, so this module imports nothing distributed): EMA counts and sums, k-means sums and
usage counts are summed over replicas; k-means seeds and dead-code restart candidates are drawn
from rank 0's rows and broadcast to all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .collectives import Collectives
from .config import QuantizerConfig, check_codebook_fits
from .nearest import nearest_codes


class VectorQuantizer(nn.Module):
    """`VectorQuantizer(QuantizerConfig(codebook_size=512), dim=64)`; `collectives` keeps
    data-parallel replicas identical (single process when omitted)."""

    def __init__(self, config: QuantizerConfig, dim: int, collectives: Collectives | None = None):
        super().__init__()
        if not isinstance(config, QuantizerConfig):
            raise TypeError(f"VectorQuantizer: config must be a QuantizerConfig, got "
                            f"{type(config).__name__} (e.g. VectorQuantizer(QuantizerConfig("
                            "codebook_size=512), dim=64))")
        if dim < 1:
            raise ValueError(f"VectorQuantizer: dim = {dim} must be >= 1")
        check_codebook_fits(config, dim)    # before torch.randn tries to allocate them
        self.config = config
        self.codebook_size = codebook_size = config.codebook_size
        self.dim = dim
        self.code_dim = config.codebook_dim or dim
        self.collectives = collectives or Collectives()
        project = self.code_dim != dim
        self.in_proj = nn.Linear(dim, self.code_dim) if project else nn.Identity()
        self.out_proj = nn.Linear(self.code_dim, dim) if project else nn.Identity()

        init = torch.randn(codebook_size, self.code_dim)
        if config.l2_normalize:
            init = F.normalize(init, dim=-1)
        # SimVQ (Zhu et al. 2024): the codebook is a frozen random basis C times one learned
        # linear map, e = W c + b; the codebook loss moves W, and so every code at once, which
        # keeps codes that no encoder output is near moving with the rest instead of dying
        self.codebook_map = nn.Linear(self.code_dim, self.code_dim) if config.simvq else None
        if config.simvq:
            self.register_buffer("codebook", init if config.l2_normalize else init * self.code_dim ** -0.5)
            if config.kmeans_init:    # k-means seeds the basis: start from the identity map
                nn.init.eye_(self.codebook_map.weight)
                nn.init.zeros_(self.codebook_map.bias)
        elif config.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # 1 once k-means init ran (or was not asked for); saved with the weights
        self.register_buffer("initialized",
                             torch.tensor(0 if config.kmeans_init else 1, dtype=torch.uint8))
        self.metrics: dict[str, torch.Tensor] = {}
        self._search_cache: tuple | None = None   # (key, codebook as searched), eval mode only

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
        if self.codebook_map is not None:    # SimVQ: the map's weights are the learned part
            key += tuple((p.data_ptr(), p._version) for p in self.codebook_map.parameters())
        if self._search_cache is None or self._search_cache[0] != key:
            self._search_cache = (key, self._search_codebook())
        return self._search_cache[1]

    @torch.no_grad()
    def _search_codebook(self) -> torch.Tensor:
        return self._codebook_for_grad().detach()

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
        """(K, code_dim) fp32 codebook: the codes, or with SimVQ the map of the frozen basis."""
        book = self.codebook.float()
        if self.codebook_map is not None:
            book = F.linear(book, self.codebook_map.weight.float(), self.codebook_map.bias.float())
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
            counts = None     # (K,) this step's code counts over all replicas, when known
            if self.config.ema:
                quantized = F.embedding(idx, self.search_codebook())   # no grad into codebook
                if self.training:
                    counts = self._ema_update(flat.detach(), idx)
            else:
                quantized = F.embedding(idx, self._codebook_for_grad())
                # codebook term: ||sg[z_e] - e||^2 moves the codes towards the encoder outputs
                losses["codebook"] = F.mse_loss(quantized, flat.detach())
            # commitment term: beta * ||z_e - sg[e]||^2 keeps the encoder near its code
            losses["commitment"] = self.config.beta * F.mse_loss(flat, quantized.detach())
            if self.config.gradient == "rotation":
                st = rotation_trick(flat, quantized.detach())
            else:   # straight-through: forward value is e, gradient flows to z_e unchanged
                st = flat + (quantized - flat).detach()
            z_q = self.out_proj(st)
            self._record_usage(idx, counts)
        return z_q.reshape(*lead_shape, self.dim).to(z.dtype), idx.reshape(lead_shape), losses

    # ---- codebook statistics (all through self.collectives) ------------------------------------
    @torch.no_grad()
    def _from_rank0(self, shape: tuple[int, int], draw) -> torch.Tensor:
        """`draw()` on rank 0 (fp32 of `shape`), broadcast so that every replica holds rank 0's;
        the other replicas draw nothing."""
        if self.collectives.rank == 0:
            out = draw()
        else:
            out = torch.zeros(shape, device=self.codebook.device)
        self.collectives.broadcast_(out, src=0)
        return out

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Lloyd's k-means on the first batch, seeded by k-means++ on rank 0's rows; sums and
        counts are summed over replicas every iteration, so all replicas end with the same
        centroids."""
        k = self.codebook_size
        centroids = self._from_rank0((k, self.code_dim), lambda: _kmeans_plus_plus(flat, k))
        for _ in range(self.config.kmeans_iters):
            # k-means only needs a good assignment: the fp32 argmin, no near-tie re-decision
            idx = nearest_codes(flat, centroids, self.config.chunk_size, exact=False)
            sums = torch.zeros_like(centroids).index_add_(0, idx, flat)
            counts = torch.bincount(idx, minlength=k).float()
            self.collectives.sum_(sums)
            self.collectives.sum_(counts)
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
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Paper appendix: N_i <- g N_i + (1-g) n_i ; m_i <- g m_i + (1-g) sum z ; e_i = m_i / N~_i
        with Laplace-smoothed N~_i = (N_i + eps) / (sum N + K eps) * sum N. Returns the step's
        counts n (K,), summed over replicas."""
        k, decay, eps = self.codebook_size, self.config.decay, self.config.eps
        # sums and counts side by side: one collective a step instead of two
        stats = torch.zeros(k, self.code_dim + 1, device=flat.device)          # (K, d + 1)
        stats[:, :-1].index_add_(0, idx, flat)
        stats[:, -1] = torch.bincount(idx, minlength=k).float()
        self.collectives.sum_(stats)
        sums, counts = stats[:, :-1], stats[:, -1]
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
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Codes whose EMA count fell below the threshold are re-seeded from encoder outputs of
        this batch drawn at random (with replacement, so any number of rows will do) on rank 0 and
        broadcast, so that every replica restarts identically. A step where rank 0 has no rows
        leaves the dead codes to the next one."""
        dead = self.ema_count < self.config.dead_code_threshold                # (K,) same on all ranks
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        # one more column: 1 where rank 0 had rows to draw from
        picks = self._from_rank0((num_dead, self.code_dim + 1), lambda: _draw_rows(flat, num_dead))
        if not bool(picks[0, -1]):
            return
        candidates = picks[:, :-1].contiguous()                            # (num_dead, code_dim)
        if self.config.l2_normalize:
            candidates = F.normalize(candidates, dim=-1)
        book = self.codebook.data.clone()
        book[dead] = candidates.to(book.dtype)
        self._set_codebook(book)
        # a restarted code counts as used once, or twice the threshold when that is lower: below
        # 1/2 a code left unused must be re-judged within ~ln 2 / (1 - decay) steps, not stay stale
        # while the encoder's outputs move (with K codes far above a batch's vectors the
        # threshold must be low, and a count of 1 would then outlive it for hundreds of steps)
        count = min(1.0, 2 * self.config.dead_code_threshold)
        self.ema_sum[dead] = candidates * count
        self.ema_count[dead] = count
        self.metrics["restarted"] = torch.tensor(float(num_dead))

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Usage and perplexity of this step's codes; `counts` (K,), when the EMA update has
        already summed them over replicas, saves a second count and collective."""
        if counts is None:
            counts = torch.bincount(idx.reshape(-1), minlength=self.codebook_size).float()
            if self.training:  # eval may run on one rank alone: a collective there would hang
                self.collectives.sum_(counts)
        self.metrics.update(usage_metrics(counts))


def usage_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """(K,) code counts of a step -> {usage: fraction of codes used, perplexity: exp(entropy)}."""
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def rotation_trick(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(N, d) encoder outputs e and their codes q -> (N, d) with the value of q and the gradient
    of lambda * R e, R the rotation taking e's direction to q's and lambda = |q| / |e| (both
    held constant): the decoder's gradient reaches the encoder rotated as e was moved, so its
    angle to the code is kept (Fifty et al. 2024, "Restructuring Vector Quantization with the
    Rotation Trick"). R e = e - 2 r (r.e) + 2 q^ (e^.e), r = (e^ + q^) / |e^ + q^|."""
    e_norm = e.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    e_hat, q_hat = e.detach() / e_norm, q / q_norm
    r = F.normalize(e_hat + q_hat, dim=-1)
    rotated = e - 2 * (e * r).sum(-1, keepdim=True) * r + 2 * (e * e_hat).sum(-1, keepdim=True) * q_hat
    out = (q_norm / e_norm) * rotated
    return out + (q - out).detach()       # the forward value exactly q (no rounding drift)


def _draw_rows(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, d + 1): rows of `flat` drawn with replacement, then a column of ones; all zeros
    when `flat` has no rows."""
    out = flat.new_zeros(rows, flat.shape[1] + 1)
    if flat.shape[0]:
        out[:, :-1] = flat[torch.randint(0, flat.shape[0], (rows,), device=flat.device)]
        out[:, -1] = 1
    return out


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
