"""`vqtok eval`: how well a tokenizer reconstructs a set of WebDataset shards.

Reports mean_psnr (the mean over images of 10*log10(1/MSE), pixels in [0, 1]), codebook usage
(fraction of the K codes used at least once), perplexity (exp of the entropy of the code
histogram; K means perfectly even use) and the image count, all as defined in
pipelines/metrics.py (training's validation records use the same functions), and draws two PNGs:
originals above their reconstructions, and the code-usage histogram. Every file is published
atomically (tokenizer.storage.write_bytes_atomic), metrics.json last.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from tokenizer import VQVAE
from tokenizer.storage import join_url, write_bytes_atomic

from .batches import batched
from .errors import UserError
from .shards.urls import expand_urls
from .metrics import code_counts, codebook_usage, mean_psnr, per_image_mse, perplexity
from .output_dir import make_output_dir
from .pictures import comparison_grid, png_bytes, usage_histogram
from .samples import Rejection, SamplePolicy
from .shards.reader import TarShardReader

GRID_NAME, HISTOGRAM_NAME, METRICS_NAME = "reconstructions.png", "code_usage.png", "metrics.json"


@dataclass
class EvalReport:
    mean_psnr: float                   # mean over images of each image's PSNR (pipelines/metrics.py)
    usage: float
    perplexity: float
    images: int
    skipped: int = 0                   # samples without a usable image
    damaged_shards: dict = field(default_factory=dict)   # shard URL -> how it ended
    codebook_size: int = 0
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def json_line(self) -> str:
        return json.dumps(self.to_dict())


class Accumulator:
    """Per-image MSEs, the code histogram and the first few (original, reconstruction) pairs."""

    def __init__(self, codebook_size: int, keep: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)
        self.mse: list[torch.Tensor] = []          # (B,) float64 per batch, on the CPU
        self.images, self.keep = 0, keep
        self.originals: list[torch.Tensor] = []
        self.recons: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        self.mse.append(per_image_mse(x, x_hat).cpu())
        self.images += len(x)
        self.counts += code_counts(codes, len(self.counts))
        room = self.keep - len(self.originals)
        self.originals += list(x[:room].cpu())
        self.recons += list(x_hat[:room].cpu())

    def report(self, skipped: list) -> EvalReport:
        return EvalReport(mean_psnr=mean_psnr(torch.cat(self.mse)), usage=codebook_usage(self.counts),
                          perplexity=perplexity(self.counts), images=self.images,
                          skipped=sum(1 for _, key, _ in skipped if key is not None),
                          damaged_shards={url: why for url, key, why in skipped if key is None},
                          codebook_size=len(self.counts))


def iter_images(urls: list[str], channels: int, resolution: int, skipped: list):
    """(C, R, R) tensors of every usable image of the shards; the rest are counted in skipped
    as (url, key, reason) by the one sample policy, a damaged shard as (url, None, why) after
    its readable head, also said on stderr."""
    policy = SamplePolicy(channels, resolution)
    for url in urls:
        reader = TarShardReader(url, policy.wants)
        for sample in reader:
            judged = policy(sample)
            if isinstance(judged, Rejection):
                skipped.append((url, judged.key, judged.reason))
                continue
            yield torch.from_numpy(np.array(judged[0], copy=True)).float() / 255   # (C, R, R)
        if reader.error:
            skipped.append((url, None, reader.error))
            print(f"warning: {url}: {reader.error}; evaluated the samples before the damage",
                  file=sys.stderr, flush=True)


def evaluate(tokenizer: str, inputs: list[str], out: str, limit: int | None = None,
             batch_size: int = 256, grid_images: int = 16, device: str | None = None) -> EvalReport:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VQVAE.from_pretrained(tokenizer, map_location=device)
    urls = expand_urls(inputs)
    make_output_dir(out, "--out")        # now, not after the whole evaluation
    acc, skipped = Accumulator(model.codebook_size, grid_images), []
    images = iter_images(urls, model.config.in_channels, model.config.resolution, skipped)
    with tqdm(total=limit, desc="eval", unit="img", file=sys.stderr) as bar:
        for batch in batched(images, batch_size, limit):
            x = torch.stack(batch).to(device)
            codes = model.encode(x)                          # (B, h, w)
            acc.add(x, model.decode(codes), codes)
            bar.update(len(x))
    if acc.images == 0:
        raise UserError(f"no decodable image in {', '.join(inputs)} ({len(skipped)} samples skipped)")
    report = acc.report(skipped)
    report.files = write_report(out, report, acc)
    return report


def write_report(out: str, report: EvalReport, acc: Accumulator) -> dict:
    """The two PNGs, then metrics.json (its presence says the report is complete), each atomic."""
    files = {"grid": join_url(out, GRID_NAME), "histogram": join_url(out, HISTOGRAM_NAME),
             "metrics": join_url(out, METRICS_NAME)}
    write_bytes_atomic(files["grid"], png_bytes(comparison_grid(acc.originals, acc.recons)))
    title = (f"code usage: {report.usage:.1%} of K={len(acc.counts)} used, perplexity "
             f"{report.perplexity:.1f}, {report.images} images")
    write_bytes_atomic(files["histogram"], png_bytes(usage_histogram(acc.counts, title)))
    metrics = {**json.loads(report.json_line()), "files": files, "counts": acc.counts.tolist()}
    write_bytes_atomic(files["metrics"], json.dumps(metrics).encode())
    return files
