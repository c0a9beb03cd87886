"""The reconstruction and codebook metrics of training, validation, eval and the benchmarks,
each defined once, under a name that says which one it is.

Pixels are in [0, 1]. Two PSNRs exist and differ (the mean of a log is not the log of a mean):

- psnr_of_mean_mse(mse) = 10 log10(1 / mse), mse the mean squared error over all pixels of all
  images (training's `train` records: mse = the batch's reconstruction loss, averaged over the
  logging interval and the ranks);
- mean_psnr(per_image_mse) = the mean over images of 10 log10(1 / mse_i) (validation records and
  `vqtok eval`). By Jensen's inequality mean_psnr >= psnr_of_mean_mse on the same images.

Codebook metrics, from a histogram `counts` (K,) of code use:

- codebook_usage(counts) = the fraction of the K codes used at least once;
- perplexity(counts) = exp(entropy of counts / sum(counts)) in nats; K means perfectly even use.
"""
from __future__ import annotations

import math

import torch

# MSE floor: a perfect reconstruction gives 10 log10(1 / 1e-10) = 100 dB instead of infinity
MSE_FLOOR = 1e-10


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Element-wise 10 log10(1 / mse) in dB, float64; mse floored at MSE_FLOOR."""
    return 10 * torch.log10(1 / mse.double().clamp_min(MSE_FLOOR))


def psnr_of_mean_mse(mse: float) -> float:
    """PSNR of one mean squared error (over all pixels of all images)."""
    return 10 * math.log10(1 / max(float(mse), MSE_FLOOR))


def per_image_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) originals and reconstructions -> (B,) float64 mean squared error per image."""
    return ((x_hat.double() - x.double()) ** 2).flatten(1).mean(1)


def mean_psnr(per_image: torch.Tensor) -> float:
    """Mean over images of each image's PSNR; per_image: (N,) MSE per image."""
    if per_image.numel() == 0:
        raise ValueError("mean_psnr of no images")
    return float(psnr(per_image).mean())


def code_counts(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Integer codes of any shape -> (k,) int64 histogram (on the CPU)."""
    return torch.bincount(codes.reshape(-1).cpu().long(), minlength=k)


def codebook_usage(counts: torch.Tensor) -> float:
    """Fraction of the codes used at least once; counts: (K,) histogram."""
    return float((counts > 0).double().mean())


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy in nats) of the code distribution counts / sum(counts); counts: (K,)."""
    p = counts.double() / max(1, int(counts.sum()))
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))
