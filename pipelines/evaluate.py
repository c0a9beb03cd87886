"""`vqtok eval`: how well a tokenizer reconstructs a set of WebDataset shards.

Reports PSNR (mean over images of 10*log10(1/MSE), pixels in [0, 1]), codebook usage (fraction
of the K codes used at least once), perplexity (exp of the entropy of the code histogram; K
means perfectly even use) and the image count, and draws two PNGs: originals above their
reconstructions, and the code-usage histogram.
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from tokenizer import VQVAE

from .data import expand_urls
from .errors import UserError
from .output_format import join
from .tokenize.preprocess import ImageError, ImagePreprocessor, find_image, is_image_field
from .tokenize.shards import TarShardReader

GRID_NAME, HISTOGRAM_NAME, METRICS_NAME = "reconstructions.png", "code_usage.png", "metrics.json"


@dataclass
class EvalReport:
    psnr: float
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


def load_image(data: bytes, channels: int, resolution: int, ext: str = "image") -> torch.Tensor:
    """Image bytes -> (C, R, R) float in [0, 1], preprocessed exactly as `vqtok tokenize` does
    (pipelines/tokenize/preprocess.py: EXIF orientation, 8-bit, alpha over white, channels,
    shorter-side resize, centre crop). Raises ImageError for unusable bytes."""
    arr = ImagePreprocessor(channels, resolution)(data, ext)                # (C, R, R) uint8
    return torch.from_numpy(np.array(arr, copy=True)).float() / 255


class Accumulator:
    """Running PSNR sum, code histogram and the first few (original, reconstruction) pairs."""

    def __init__(self, codebook_size: int, keep: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)
        self.psnr_sum, self.images, self.keep = 0.0, 0, keep
        self.originals: list[torch.Tensor] = []
        self.recons: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        mse = ((x_hat.float() - x.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
        self.psnr_sum += float((10 * torch.log10(1.0 / mse)).sum())
        self.images += len(x)
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=len(self.counts))
        room = self.keep - len(self.originals)
        self.originals += list(x[:room].cpu())
        self.recons += list(x_hat[:room].cpu())

    def report(self, skipped: list) -> EvalReport:
        p = self.counts.double() / max(1, int(self.counts.sum()))
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        return EvalReport(psnr=self.psnr_sum / self.images, usage=float((self.counts > 0).double().mean()),
                          perplexity=math.exp(entropy), images=self.images,
                          skipped=sum(1 for _, key, _ in skipped if key is not None),
                          damaged_shards={url: why for url, key, why in skipped if key is None},
                          codebook_size=len(self.counts))


def iter_images(urls: list[str], channels: int, resolution: int, skipped: list):
    """(C, R, R) tensors of every usable image of the shards; the rest are counted in skipped,
    a damaged shard as (url, None, why) after its readable head, also said on stderr."""
    preprocess = ImagePreprocessor(channels, resolution)
    for url in urls:
        reader = TarShardReader(url, is_image_field)
        for sample in reader:
            found = find_image(sample.fields) if sample.complete else None
            if found is None:
                skipped.append((url, sample.key, "no_image" if sample.complete else "incomplete_sample"))
                continue
            try:
                arr = preprocess(found[1], found[0])                   # (C, R, R) uint8
            except ImageError as e:
                skipped.append((url, sample.key, e.reason))
                continue
            yield torch.from_numpy(np.array(arr, copy=True)).float() / 255
        if reader.error:
            skipped.append((url, None, reader.error))
            print(f"warning: {url}: {reader.error}; evaluated the samples before the damage",
                  file=sys.stderr, flush=True)


def evaluate(tokenizer: str, inputs: list[str], out: str, limit: int | None = None,
             batch_size: int = 256, grid_images: int = 16, device: str | None = None) -> EvalReport:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VQVAE.from_pretrained(tokenizer, map_location=device)
    urls = expand_urls(inputs)
    acc, skipped = Accumulator(model.codebook_size, grid_images), []
    images = iter_images(urls, model.config.in_channels, model.config.resolution, skipped)
    with tqdm(total=limit, desc="eval", unit="img", file=sys.stderr) as bar:
        for x in _batches(images, batch_size, limit):
            x = x.to(device)
            codes = model.encode(x)                          # (B, h, w)
            acc.add(x, model.decode(codes), codes)
            bar.update(len(x))
    if acc.images == 0:
        raise UserError(f"no decodable image in {', '.join(inputs)} ({len(skipped)} samples skipped)")
    report = acc.report(skipped)
    report.files = write_report(out, report, acc)
    return report


def _batches(images, batch_size: int, limit: int | None):
    batch, seen = [], 0
    for x in images:
        if limit is not None and seen >= limit:
            break
        batch.append(x)
        seen += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def write_report(out: str, report: EvalReport, acc: Accumulator) -> dict:
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    files = {"grid": join(out, GRID_NAME), "histogram": join(out, HISTOGRAM_NAME),
             "metrics": join(out, METRICS_NAME)}
    fs.pipe_file(fs._strip_protocol(files["grid"]), _png(comparison_grid(acc.originals, acc.recons)))
    fs.pipe_file(fs._strip_protocol(files["histogram"]), _png(usage_histogram(acc.counts, report)))
    metrics = {**json.loads(report.json_line()), "files": files, "counts": acc.counts.tolist()}
    fs.pipe_file(fs._strip_protocol(files["metrics"]), json.dumps(metrics).encode())
    return files


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def comparison_grid(originals: list[torch.Tensor], recons: list[torch.Tensor], per_row: int = 8,
                    pad: int = 2) -> Image.Image:
    """Pairs of rows: originals above their reconstructions, tiles scaled up to >= 64 px."""
    tiles = [(_tile(o), _tile(r)) for o, r in zip(originals, recons)]
    side = tiles[0][0].size[0]
    cols = min(per_row, len(tiles))
    bands = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * (side + pad) + pad, bands * (2 * side + 3 * pad) + pad), "white")
    for i, (o, r) in enumerate(tiles):
        x = pad + (i % cols) * (side + pad)
        y = pad + (i // cols) * (2 * side + 3 * pad)
        canvas.paste(o, (x, y))
        canvas.paste(r, (x, y + side + pad))
    return canvas


def _tile(image: torch.Tensor) -> Image.Image:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()         # (C, H, W)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).convert("RGB")
    scale = max(1, math.ceil(64 / img.size[0]))
    return img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)


def usage_histogram(counts: torch.Tensor, report: EvalReport, height: int = 160) -> Image.Image:
    """Two bar plots: count per code index, and the same counts sorted (dead codes show as the
    empty tail)."""
    k = len(counts)
    bar = max(1, 1024 // k)
    width = max(k * bar, 200) + 20
    canvas = Image.new("RGB", (width, 2 * height + 70), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 4), f"code usage: {report.usage:.1%} of K={k} used, perplexity "
                       f"{report.perplexity:.1f}, {report.images} images", fill="black")
    values = counts.double().numpy()
    peak = int(values.max())
    for row, (label, v) in enumerate([("by code index", values), ("sorted by count", np.sort(values)[::-1])]):
        top = 24 + row * (height + 22)
        draw.text((10, top), f"{label} (log scale, max {peak:,})", fill="black")
        _bars(draw, v, 10, top + 14, k * bar, height - 14, bar)
    return canvas


def _bars(draw: ImageDraw.ImageDraw, values: np.ndarray, x0: int, y0: int, w: int, h: int, bar: int) -> None:
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline="grey")
    peak = math.log1p(values.max()) or 1.0            # log scale: rare codes stay visible
    for i, v in enumerate(values):
        if v > 0:
            y = y0 + h - max(1, round(h * math.log1p(v) / peak))
            draw.rectangle((x0 + i * bar, y, x0 + (i + 1) * bar - 1, y0 + h), fill="steelblue")
