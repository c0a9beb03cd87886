"""A folder tree of images -> WebDataset shards of SxS images (resized, or random crops).

Source files are found and decoded by the one image policy (pipelines/images.py:
its extensions, EXIF orientation, 8-bit, alpha over white, RGB); a whole-image shard gets the
policy's shorter-side resize and centre crop, so its pixels are what `vqtok tokenize` would
make of the source file at size S. Random crops are cut at the source's (or --short-side's)
scale."""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass

import fsspec
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..pictures import png_bytes
from ..images import IMAGE_EXTS, ImageError, ImagePreprocessor
from ..output_dir import make_output_dir
from ..shards.writer import ShardWriter

IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)


@dataclass
class FolderOptions:
    size: int = 32                 # output side S
    crops_per_image: int = 0       # 0: one centre-cropped, resized SxS image per file
    short_side: int = 0            # before cropping, scale the shorter side to this (0 = keep)
    largest_per_dir: bool = False  # one file per top-level directory: its largest (wallpapers)
    holdout: int = 0               # source images written to holdout-%06d.tar instead
    seed: int = 0
    shard_size: int = 5000

    def __post_init__(self):
        for key in ("size", "shard_size"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} = {getattr(self, key)} must be >= 1")
        for key in ("crops_per_image", "short_side", "holdout"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key.replace('_', '-')} = {getattr(self, key)} must be >= 0")


def list_images(src: str, largest_per_dir: bool) -> list[str]:
    fs, root = fsspec.core.url_to_fs(src)
    if not fs.isdir(root):
        raise UserError(f"{src}: not a directory")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    if largest_per_dir:
        # one picture per top-level directory (a wallpaper package ships it in many sizes)
        best: dict[str, tuple[int, str]] = {}
        for p in files:
            d = p[len(root.rstrip("/")) + 1:].split("/", 1)[0]
            size = _pixels(fs, p)
            if d not in best or size > best[d][0]:
                best[d] = (size, p)
        files = sorted(p for _, p in best.values())
    if not files:
        raise UserError(f"{src}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return [fs.unstrip_protocol(p) if "://" in src else p for p in files]


def _pixels(fs, path: str) -> int:
    """Width x height from the image header (0 when unreadable: it loses the contest and a
    readable sibling is used)."""
    try:
        with fs.open(path, "rb") as f, Image.open(f) as img:
            return img.size[0] * img.size[1]
    except Exception:
        return 0


def open_image(url: str, opts: FolderOptions) -> Image.Image:
    """The source file as an RGB image by the image policy. For whole images (no crops) a large
    JPEG is decoded at the reduced DCT scale tokenize uses for size S; crops see every pixel.
    Raises ImageError (or OSError when it cannot be read)."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    policy = ImagePreprocessor(3, opts.size)
    return policy.decode(data, url.rsplit("/", 1)[-1], draft=opts.crops_per_image == 0)


def scale_short_side(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    s = side / min(w, h)
    return img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)


def centre_square(img: Image.Image, size: int) -> Image.Image:
    """The policy's step 5: shorter side to `size`, then the centre square."""
    return ImagePreprocessor(3, size).resize_crop(img)


def views(img: Image.Image, opts: FolderOptions, rng: random.Random):
    """Yield (PIL SxS image, metadata) for one source image."""
    if opts.crops_per_image == 0:      # straight from the source, as tokenize would see it
        yield centre_square(img, opts.size), {"crop": "centre"}
        return
    if opts.short_side:
        img = scale_short_side(img, opts.short_side)
    w, h = img.size
    if min(w, h) < opts.size:
        img = scale_short_side(img, opts.size)
        w, h = img.size
    for _ in range(opts.crops_per_image):
        x, y = rng.randint(0, w - opts.size), rng.randint(0, h - opts.size)
        yield img.crop((x, y, x + opts.size, y + opts.size)), {"x": x, "y": y}


def prepare_folder(src: str, out: str, opts: FolderOptions, progress: bool = True) -> dict:
    """Returns {"images": shard paths, "holdout": shard paths, "skipped": [(file, reason)]}."""
    make_output_dir(out, "--out")
    files = list_images(src, opts.largest_per_dir)
    if opts.holdout and opts.holdout >= len(files):
        raise UserError(f"--holdout {opts.holdout} leaves no training images (found {len(files)})")
    order = list(files)
    random.Random(opts.seed).shuffle(order)   # the first `holdout` readable files are held out
    rng = random.Random(opts.seed + 1)
    skipped: list[tuple[str, str]] = []
    counters = {"images": 0, "holdout": 0}
    with ShardWriter(out, "images-%06d.tar", opts.shard_size) as train, \
            ShardWriter(out, "holdout-%06d.tar", opts.shard_size) as hold:
        held = 0
        for path in tqdm(order, desc="images", unit="file", disable=not progress):
            try:
                img = open_image(path, opts)
            except (ImageError, OSError) as e:
                reason = str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"
                skipped.append((path, reason))
                print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
                continue
            split = "holdout" if held < opts.holdout else "images"
            held += split == "holdout"
            writer = hold if split == "holdout" else train
            for view, meta in views(img, opts, rng):
                key = f"{split}{counters[split]:08d}"
                counters[split] += 1
                meta = {"source": path, **meta}
                writer.write({"__key__": key, "png": png_bytes(view), "json": json.dumps(meta).encode()})
    return {"images": train.written, "holdout": hold.written, "skipped": skipped,
            "counts": counters}
