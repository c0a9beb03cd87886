"""`vqtok prior eval`: how many bits a prior needs for held-out codes, against two baselines.

- bits_per_code: the prior's mean negative log2-likelihood of each held-out code, every code of
  every row in raster order, the first one given only the class;
- unigram_bits_per_code: the same codes under the training codes' histogram with add-one
  (Laplace) smoothing, p_k = (n_k + 1) / (N + K): what a model that ignores position, class and
  context needs;
- uniform_bits_per_code: log2 K, what the raw code indices cost;
- bits_per_image = bits_per_code * h * w;
- bits_per_dim: the VQ-VAE paper's measure, a bound on -log2 p(x) per pixel channel:
  (bits_per_image + reconstruction bits per image) / (C * H * W), where the reconstruction term
  is -log2 p(x | z) of the 8-bit pixels under a discretised Gaussian around the tokenizer's
  reconstruction with sigma the RMSE (8-bit units) over the evaluated images. It needs the
  pixels, which the codes do not hold: pass --tokenizer and --images (the held-out shards the
  codes were made from); without them it is null and bits_per_dim_note says why;
- train_bits_per_code (measured on the training rows at export) and the gap to bits_per_code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..decode import load_tokenizer_for
from ..errors import UserError
from ..batches import batched
from ..evaluate import iter_images
from ..readers import CodesDataset
from ..shards.urls import expand_urls
from .export import load_prior

LN2 = math.log(2)


@dataclass
class CodeNLL:
    nats: float                 # summed over every code evaluated
    codes: int
    rows: int
    counts: np.ndarray          # (K,) histogram of the codes evaluated

    @property
    def bits_per_code(self) -> float:
        return self.nats / max(1, self.codes) / LN2


def _batches(dataset: CodesDataset, label: str | None, batch_size: int, limit: int | None):
    """(codes (B, h, w) int64 array, labels (B,) or None) of the first `limit` rows, in order."""
    left = limit if limit is not None else float("inf")
    for block in dataset.blocks():
        if left <= 0:
            return
        n = int(min(len(block.codes), left))
        left -= n
        labels = np.asarray(block.extra[label][:n], dtype=np.int64) if label else None
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            yield block.codes[start:stop], None if labels is None else labels[start:stop]


@torch.no_grad()
def code_nll(model, dataset: CodesDataset, label: str | None, limit: int | None = None,
             batch_size: int = 256, device: str | torch.device = "cpu") -> CodeNLL:
    """The prior's summed negative log-likelihood (nats) of the first `limit` rows of `dataset`
    (all by default), in eval mode. Class ids outside the prior's classes are a UserError."""
    model.eval()
    classes = model.config.num_classes
    nats, codes, rows = 0.0, 0, 0
    counts = np.zeros(model.config.codebook_size, dtype=np.int64)
    for grid, labels in _batches(dataset, label, batch_size, limit):
        cls = None
        if labels is not None:
            if labels.size and (labels.min() < 0 or labels.max() >= classes):
                bad = int(labels.max() if labels.max() >= classes else labels.min())
                raise UserError(f"{dataset.url}: class id {bad} in column {label!r} is outside the "
                                f"prior's {classes} classes")
            cls = torch.from_numpy(labels).to(device)
        nll = model.nll(torch.from_numpy(grid).to(device), cls)                    # (B, h*w) nats
        nats += float(nll.double().sum())
        codes += nll.numel()
        rows += len(grid)
        counts += np.bincount(grid.reshape(-1), minlength=len(counts))
    return CodeNLL(nats, codes, rows, counts)


def unigram_bits(train_counts: np.ndarray, counts: np.ndarray) -> float:
    """Mean -log2 p(code) of codes with histogram `counts` under the add-one smoothed training
    histogram `train_counts` (both (K,))."""
    k = len(train_counts)
    p = (train_counts.astype(np.float64) + 1) / (float(train_counts.sum()) + k)
    return float(-(counts * np.log2(p)).sum() / max(1, counts.sum()))


# ---- the reconstruction term (bits_per_dim) ------------------------------------------------------
def discretised_gaussian_bits(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log2 P(x) per image, summed over its pixels: x (B, C, H, W) 8-bit levels 0..255 (float),
    mean the same shape on the same scale; P is a Gaussian N(mean, sigma^2) integrated over each
    level's bin [x - 0.5, x + 0.5], the edge bins open to -inf / +inf (so P sums to 1)."""
    x, mean = x.double(), mean.double()
    upper = torch.where(x >= 255, torch.ones_like(x), torch.special.ndtr((x + 0.5 - mean) / sigma))
    lower = torch.where(x <= 0, torch.zeros_like(x), torch.special.ndtr((x - 0.5 - mean) / sigma))
    p = (upper - lower).clamp_min(1e-300)
    return -(torch.log2(p)).flatten(1).sum(1)


# sigmas tried for the reconstruction term (8-bit units): the one with the fewest bits is the
# maximum-likelihood sigma of the evaluated images, to within a factor 2^(1/4)
SIGMAS = tuple(2 ** (i / 4) for i in range(-4, 25))          # 0.5 .. 64


@torch.no_grad()
def reconstruction_bits(tokenizer, urls: list[str], limit: int | None, batch_size: int, device) -> dict:
    """{"bits_per_image", "sigma", "images"}: -log2 p(x | z) per image over the images of `urls`
    (preprocessed as tokenize does), z their codes under `tokenizer`, with the sigma (of SIGMAS)
    that makes it smallest."""
    c, r = tokenizer.config.in_channels, tokenizer.config.resolution
    bits = torch.zeros(len(SIGMAS), dtype=torch.float64)
    images, skipped = 0, []
    for batch in batched(iter_images(urls, c, r, skipped), batch_size, limit):
        x = torch.stack(batch).to(device)                                     # (B, C, R, R)
        levels, mean = torch.round(x * 255), tokenizer.decode(tokenizer.encode(x)) * 255
        for i, sigma in enumerate(SIGMAS):
            bits[i] += float(discretised_gaussian_bits(levels, mean, sigma).sum())
        images += len(x)
    if images == 0:
        raise UserError(f"no decodable image in {', '.join(urls)} ({len(skipped)} samples skipped)")
    best = int(bits.argmin())
    return {"bits_per_image": float(bits[best]) / images, "sigma": SIGMAS[best], "images": images}


# ---- the command -------------------------------------------------------------------------------------
def evaluate_prior(prior: str, codes: str, limit: int | None = None, batch_size: int = 256,
                   tokenizer: str | None = None, images: list[str] | None = None,
                   device: str | None = None) -> dict:
    """The one JSON object `vqtok prior eval` prints (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be >= 1")
    if bool(tokenizer) != bool(images):
        raise UserError("--tokenizer and --images go together: bits_per_dim needs the held-out images "
                        "and the tokenizer that made their codes")
    export = load_prior(prior, device)
    dataset = CodesDataset(codes, rank=0, world_size=1, fields=None)
    export.check_codes(dataset.metadata, codes)
    label = export.label
    if label and label not in dataset.fields:
        raise UserError(f"{codes}: no {label!r} column, and the prior {prior} is class-conditional "
                        f"({export.model.config.num_classes} classes): tokenize the held-out shards with "
                        f"--keep-fields {label}")
    held = code_nll(export.model, dataset, label, limit, batch_size, device)
    h, w = export.model.config.grid
    k = export.model.config.codebook_size
    result = {"bits_per_code": held.bits_per_code,
              "unigram_bits_per_code": unigram_bits(export.stats.code_counts, held.counts),
              "uniform_bits_per_code": math.log2(k),
              "bits_per_image": held.bits_per_code * h * w}
    result["vs_unigram"] = result["bits_per_code"] / result["unigram_bits_per_code"]
    meta = dataset.metadata
    dims = meta.channels * meta.resolution * meta.resolution
    if tokenizer:
        model = load_tokenizer_for(tokenizer, meta, codes, device)
        recon = reconstruction_bits(model, expand_urls(images), limit, batch_size, device)
        result["bits_per_dim"] = (result["bits_per_image"] + recon["bits_per_image"]) / dims
        result["reconstruction_bits_per_dim"] = recon["bits_per_image"] / dims
        result["sigma"] = recon["sigma"]
        result["images"] = recon["images"]
        result["bits_per_dim_note"] = (
            f"(prior bits + reconstruction bits) per image / {dims} dims; reconstruction term: 8-bit "
            f"pixels under a discretised Gaussian around the tokenizer's reconstruction, sigma "
            f"{recon['sigma']:.2f} fitted to the images" +
            ("" if recon["images"] == held.rows else
             f"; the {recon['images']} images are not the {held.rows} code rows: pass the shards the codes came from"))
    else:
        result["bits_per_dim"] = None
        result["bits_per_dim_note"] = ("needs the held-out pixels for the reconstruction term -log2 p(x|z): pass "
                                       "--tokenizer TOK --images 'SHARDS' (the shards the codes were made from)")
    train = export.metadata.get("train_bits_per_code")
    result["train_bits_per_code"] = train
    result["train_test_gap_bits_per_code"] = None if train is None else result["bits_per_code"] - train
    result.update({"rows": held.rows, "codes_per_image": h * w, "codebook_size": k,
                   "classes": export.model.config.num_classes, "prior": prior, "codes": codes})
    return result
