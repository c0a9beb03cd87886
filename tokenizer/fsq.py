"""Finite scalar quantisation (Mentzer et al. 2024, "Finite Scalar Quantization: VQ-VAE Made
Simple"): the encoder output is projected to len(levels) channels, each bounded by a shifted tanh
to L_i values and rounded; the code is the mixed-radix number of the rounded digits, in
[0, prod(levels)). There is no codebook to learn, search or restart, so no codebook loss and no
statistics to keep equal across replicas; usage is counted (over replicas while training).

Determinism: a vector's code depends on that vector alone. `nearest` projects each vector in
float64, one row at a time in the same order whatever the batch (an elementwise product summed over
the last dimension, never a GEMM whose blocking depends on the batch), bounds it in float64 and
rounds half to even (`torch.round`); a bounded value exactly half-way between two levels goes to
the even one. Training rounds the fp32 values the same way.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .collectives import Collectives
from .config import QuantizerConfig
from .quantizer import usage_metrics

# rows projected per float64 block in `nearest` (rows x levels x dim doubles at most ~32 MiB)
_PROJECT_BYTES = 32 << 20


class FiniteScalarQuantizer(nn.Module):
    """`FiniteScalarQuantizer(QuantizerConfig(kind="fsq", levels=[8, 8, 6, 5, 5]), dim=64)`: the
    same interface as VectorQuantizer (forward, nearest, lookup, metrics, codebook_size)."""

    def __init__(self, config: QuantizerConfig, dim: int, collectives: Collectives | None = None):
        super().__init__()
        if not isinstance(config, QuantizerConfig) or config.kind != "fsq":
            raise TypeError("FiniteScalarQuantizer: config must be a QuantizerConfig with kind='fsq'")
        if dim < 1:
            raise ValueError(f"FiniteScalarQuantizer: dim = {dim} must be >= 1")
        self.config = config
        self.dim = dim
        self.levels_list = list(config.levels)
        self.codebook_size = math.prod(self.levels_list)
        self.collectives = collectives or Collectives()
        channels = len(self.levels_list)
        self.in_proj = nn.Linear(dim, channels)
        self.out_proj = nn.Linear(channels, dim)
        levels = torch.tensor(self.levels_list, dtype=torch.float64)
        # (d,) constants, float64 (non-persistent: they follow from the config)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(self.levels_list[:i]) for i in range(channels)],
                                                   dtype=torch.long), persistent=False)
        self.register_buffer("half_width", torch.floor(levels / 2), persistent=False)
        self.metrics: dict[str, torch.Tensor] = {}

    # ---- the scalar quantiser -------------------------------------------------------------------
    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, d) in (-L/2 - 0.5, L/2 + 0.5) around the L integers that rounding yields:
        for odd L the integers -(L-1)/2..(L-1)/2, for even L -L/2..L/2-1 (a shift by 1/2)."""
        levels = self.levels.to(h.dtype)
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels.remainder(2) == 0, 0.5, 0.0).to(h.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(h + shift) * half_l - offset

    def digits_to_values(self, digits: torch.Tensor) -> torch.Tensor:
        """(N, d) int64 digits in [0, L) -> (N, d) fp32 values in [-1, 1]."""
        half = self.half_width.float()
        return (digits.float() - half) / half

    def digits_to_index(self, digits: torch.Tensor) -> torch.Tensor:
        return (digits * self.basis).sum(-1)

    def index_to_digits(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.div(idx[..., None], self.basis, rounding_mode="floor") % self.levels.long()

    def _digits(self, rounded: torch.Tensor) -> torch.Tensor:
        """Rounded bounded values -> digits in [0, L) (the clamp only guards the float edges)."""
        half = self.half_width.to(rounded.dtype)
        digits = (rounded + half).long()
        return torch.minimum(digits.clamp_min(0), self.levels.long() - 1)

    # ---- encode / decode ------------------------------------------------------------------------
    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., dim) -> (...) int64 codes in [0, prod(levels)), each from its own vector alone."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"nearest: last dim of z is {z.shape[-1]}, the quantiser expects {self.dim}")
        flat = z.reshape(-1, self.dim).double()
        weight = self.in_proj.weight.detach().double()                  # (d, dim)
        bias = self.in_proj.bias.detach().double()
        rows = max(1, _PROJECT_BYTES // (8 * weight.numel()))
        out = []
        for block in flat.split(rows):
            h = (block[:, None, :] * weight[None]).sum(-1) + bias        # (n, d) float64, row by row
            out.append(self.digits_to_index(self._digits(torch.round(self.bound(h)))))
        idx = torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=z.device)
        return idx.reshape(z.shape[:-1])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., dim)."""
        return self.out_proj(self.digits_to_values(self.index_to_digits(idx)))

    # ---- training forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        """z: (..., dim) -> (z_q (..., dim), idx (...), losses): rounding passes the gradient
        straight through; FSQ has no codebook or commitment loss, only, when config.decorrelation
        > 0, the weighted correlation of its channels over this replica's batch."""
        lead_shape = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.in_proj(z.reshape(-1, self.dim).float())             # (N, d) fp32
            bounded = self.bound(h)
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            digits = self._digits(rounded.detach())
            values = rounded / self.half_width.float()                   # (N, d) in [-1, 1]
            z_q = self.out_proj(values)
            idx = self.digits_to_index(digits)
            self._record_usage(idx)
            losses = {}
            if self.training and self.config.decorrelation > 0 and h.shape[0] > 1:
                losses["decorrelation"] = self.config.decorrelation * channel_correlation(bounded)
        return z_q.reshape(*lead_shape, self.dim).to(z.dtype), idx.reshape(lead_shape), losses

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        if self.training:   # eval may run on one rank alone: a collective there would hang
            self.collectives.sum_(counts)
        self.metrics.update(usage_metrics(counts))


def channel_correlation(x: torch.Tensor) -> torch.Tensor:
    """(N, d) -> mean squared correlation between distinct channels over the N rows (0 when
    uncorrelated, 1 when all move together). Correlated channels fill a thin slice of the levels'
    grid, so most codes go unused; config.decorrelation weighs this as a loss."""
    d = x.shape[1]
    if d < 2:
        return x.sum() * 0
    centred = x - x.mean(0)
    scaled = centred / centred.pow(2).mean(0).add(1e-6).sqrt()
    corr = scaled.T @ scaled / x.shape[0]                                   # (d, d)
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / (d * (d - 1))
