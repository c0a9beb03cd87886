"""Every PNG and picture that vqtok draws, written once: image -> PNG bytes, grids of images,
originals-vs-reconstructions grids and the code-usage histogram.

Images come as (C, H, W) floats in [0, 1] (torch tensors or numpy arrays; C = 1 grey, 3 RGB) or
as uint8 arrays (H, W) / (H, W, 3). No torch import here: prepare uses png_bytes too.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

MIN_TILE = 64      # grid tiles are scaled up by a whole factor to at least this many pixels


def to_uint8(image) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) uint8 for C = 1, (H, W, C) otherwise; rounding half
    to even, as torch.round. uint8 arrays pass through unchanged."""
    arr = _numpy(image)
    if arr.dtype == np.uint8:
        return arr
    arr = np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))


def to_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(to_uint8(image))


def png_bytes(image) -> bytes:
    """An image (PIL, uint8 array or (C, H, W) float in [0, 1]) -> PNG file bytes (grey or RGB)."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(rows: list[list], pad: int = 2, min_tile: int = MIN_TILE, band: int = 0) -> Image.Image:
    """Rows of images (each (C, H, W) in [0, 1] or uint8, all one size) on a white RGB canvas,
    `pad` pixels apart, each scaled up by a whole factor to >= `min_tile` pixels. `band` > 0
    leaves an extra 2 * pad gap after every `band` rows (pairs of rows read as one band)."""
    tiles = [[to_pil(image).convert("RGB") for image in row] for row in rows if len(row)]
    if not tiles:
        raise ValueError("image_grid of no images")
    w, h = tiles[0][0].size
    scale = max(1, math.ceil(min_tile / min(w, h)))
    w, h = w * scale, h * scale
    cols = max(len(row) for row in tiles)
    gaps = (len(tiles) - 1) // band if band else 0
    canvas = Image.new("RGB", (cols * (w + pad) + pad, len(tiles) * (h + pad) + pad + 2 * pad * gaps), "white")
    y = pad
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas.paste(tile.resize((w, h), Image.NEAREST), (pad + c * (w + pad), y))
        y += h + pad + (2 * pad if band and (r + 1) % band == 0 else 0)
    return canvas


def comparison_grid(originals: list, recons: list, per_row: int = 8) -> Image.Image:
    """Bands of two rows: up to `per_row` originals above their reconstructions."""
    n = min(len(originals), len(recons))
    rows = []
    for start in range(0, n, per_row):
        rows += [list(originals[start:start + per_row]), list(recons[start:start + per_row])]
    return image_grid(rows, band=2)


def usage_histogram(counts, title: str, height: int = 160) -> Image.Image:
    """Two bar plots of a (K,) code histogram: count per code index, and the same counts sorted
    (dead codes show as the empty tail); log scale so that rare codes stay visible."""
    values = _numpy(counts).astype(np.float64)
    k = len(values)
    bar = max(1, 1024 // k)
    width = max(k * bar, 200) + 20
    canvas = Image.new("RGB", (width, 2 * height + 70), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 4), title, fill="black")
    peak = int(values.max()) if k else 0
    for row, (label, v) in enumerate([("by code index", values), ("sorted by count", np.sort(values)[::-1])]):
        top = 24 + row * (height + 22)
        draw.text((10, top), f"{label} (log scale, max {peak:,})", fill="black")
        _bars(draw, v, 10, top + 14, k * bar, height - 14, bar)
    return canvas


def _bars(draw: ImageDraw.ImageDraw, values: np.ndarray, x0: int, y0: int, w: int, h: int, bar: int) -> None:
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline="grey")
    peak = math.log1p(values.max()) if len(values) else 0.0
    peak = peak or 1.0
    for i, v in enumerate(values):
        if v > 0:
            y = y0 + h - max(1, round(h * math.log1p(v) / peak))
            draw.rectangle((x0 + i * bar, y, x0 + (i + 1) * bar - 1, y0 + h), fill="steelblue")


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):                   # a torch tensor, possibly on an accelerator
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()   # bf16/fp16 -> float32
    return np.asarray(x)
