"""Peak memory of one sample through the image policy, for hostile images, old policy vs new.

    python benchmarks/hostile_memory.py [--resolution 32] [--channels 3] [--only NAME ...]

Each case is an image built here (long thin PNGs, tiny files that declare many pixels in PNG,
GIF, BMP (RLE8), TIFF, JPEG (arithmetic-coded ones need libjpeg-turbo's jpegtran) and WebP,
and photographs for reference), run through
`ImagePreprocessor(channels, resolution)` in a fresh interpreter per case and policy. The
figure is that process's peak resident memory (VmHWM) growth over the one call, so it sees
Pillow's allocations, which tracemalloc does not, and does not start at the parent's size, as
ru_maxrss of a forked child does.

- old: the policy before memory was bounded (reimplemented here): resize the whole image so its
  shorter side is the resolution, then crop the centre; no pixel budget per encoded byte;
  16-bit grey brought to 8-bit through whole-image float64 arrays;
- new: `pipelines.images.ImagePreprocessor` as it is.

Both keep Pillow's own decompression-bomb limit (MAX_IMAGE_PIXELS), so no case declares more.
The old policy needs a few GB for the long thin PNGs (more at higher resolutions).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root

import argparse  # noqa: E402
import glob  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.images import ImageError, ImagePreprocessor  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "pipelines"))
from crafted_images import (bmp_rle8_declaring, gif_declaring, jpeg_declaring,  # noqa: E402
                            png_declaring, tiff_declaring)

BIG = 9000          # 9000 x 9000 = 81 M pixels: under Pillow's own bomb limit (89.5 M)
PHOTOS = "/usr/share/wallpapers/*/contents/images/*.jpg"


# -- the policy before (for the side-by-side) --------------------------------------------------

class OldPolicy(ImagePreprocessor):
    """Today's decode steps without the pixel budget, and the old resize-then-crop."""

    def _check_budget(self, *args) -> None:
        pass

    def _to_mode(self, img: Image.Image) -> Image.Image:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            arr = np.asarray(img)
            if img.mode == "F":
                arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0
            else:
                arr = arr.astype(np.float64) / 257.0
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return super()._to_mode(img)

    def _resize_crop(self, img: Image.Image) -> Image.Image:
        r = self.resolution
        w, h = img.size
        if (w, h) != (r, r):
            scale = r / min(w, h)
            size = (max(r, round(w * scale)), max(r, round(h * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            w, h = size
        if (w, h) != (r, r):
            left, top = (w - r) // 2, (h - r) // 2
            img = img.crop((left, top, left + r, top + r))
        return img


# -- the cases -----------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(largest: bool) -> bytes:
    """A wallpaper photograph (the largest file, or the smallest 1920-wide one), else noise."""
    found = sorted(glob.glob(PHOTOS), key=os.path.getsize)
    if not largest:
        found = [f for f in found if os.path.basename(f).startswith("1920x")][:1]
    if not found:
        return encode(Image.effect_noise((1920, 1080), 64).convert("RGB"), "JPEG", quality=90)
    with open(found[-1], "rb") as f:
        return f.read()


def arithmetic_progressive(img: Image.Image) -> bytes | None:
    """The JPEG recoded with arithmetic coding, progressive (libjpeg-turbo's jpegtran), which
    Pillow decodes but cannot write; None without jpegtran."""
    if not shutil.which("jpegtran"):
        return None
    done = subprocess.run(["jpegtran", "-arithmetic", "-progressive"], input=encode(img, "JPEG", quality=1),
                          capture_output=True, check=True)
    return done.stdout


def cases() -> dict[str, callable]:
    """name -> () -> bytes, built lazily (some take a second)."""
    ramp = lambda n: (np.arange(n) * 256 // n).astype(np.uint8)   # noqa: E731
    return {
        "photo JPEG 1920x1080 (reference)": lambda: photo(largest=False),
        "photo JPEG largest (reference)": lambda: photo(largest=True),
        "photo PNG 1280x800 (reference)": lambda: encode(
            Image.open(io.BytesIO(photo(largest=False))).convert("RGB").resize((1280, 800)), "PNG"),
        "PNG 200000x1 grey ramp": lambda: encode(Image.fromarray(ramp(200_000)[None]), "PNG"),
        "PNG 1x400000 blank": lambda: encode(Image.new("L", (1, 400_000)), "PNG", compress_level=9),
        "PNG 1-bit 3000x3000 blank": lambda: encode(Image.new("1", (3000, 3000)), "PNG", optimize=True),
        f"PNG 1-bit {BIG}x{BIG} blank": lambda: encode(Image.new("1", (BIG, BIG)), "PNG", optimize=True),
        f"PNG 8-bit {BIG}x{BIG} blank": lambda: encode(Image.new("L", (BIG, BIG)), "PNG", compress_level=9),
        f"PNG 16-bit {BIG}x{BIG} blank": lambda: encode(Image.new("I;16", (BIG, BIG)), "PNG", compress_level=9),
        f"PNG header only {BIG}x{BIG}": lambda: png_declaring(BIG, BIG),
        f"GIF {BIG}x{BIG} blank": lambda: encode(Image.new("P", (BIG, BIG)), "GIF"),
        f"GIF header only {BIG}x{BIG}": lambda: gif_declaring(BIG, BIG),
        f"BMP RLE8 {BIG}x{BIG} end-of-bitmap": lambda: bmp_rle8_declaring(BIG, BIG),
        f"TIFF G4 {BIG}x{BIG} blank": lambda: encode(Image.new("1", (BIG, BIG), 1), "TIFF", compression="group4"),
        f"TIFF header only {BIG}x{BIG}": lambda: tiff_declaring(BIG, BIG),
        f"JPEG header says {BIG}x{BIG}": lambda: jpeg_declaring(BIG, BIG),
        f"JPEG {BIG}x{BIG} blank q1": lambda: encode(Image.new("L", (BIG, BIG)), "JPEG", quality=1),
        f"JPEG progressive {BIG}x{BIG} blank q1": lambda: encode(Image.new("L", (BIG, BIG)), "JPEG",
                                                                   quality=1, progressive=True),
        f"JPEG progressive RGB {BIG}x{BIG} q1": lambda: encode(Image.new("RGB", (BIG, BIG)), "JPEG",
                                                                 quality=1, progressive=True),
        "JPEG arith. progressive 8000x8000 RGB": lambda: arithmetic_progressive(Image.new("RGB", (8000, 8000))),
        f"JPEG arith. progressive {BIG}x{BIG}": lambda: arithmetic_progressive(Image.new("L", (BIG, BIG))),
        f"WebP lossless {BIG}x{BIG} blank": lambda: encode(Image.new("RGB", (BIG, BIG)), "WEBP", lossless=True),
    }


# -- one measurement (in a fresh interpreter) --------------------------------------------------

def peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(path: str, policy: str, channels: int, resolution: int) -> None:
    cls = OldPolicy if policy == "old" else ImagePreprocessor
    pre = cls(channels, resolution)
    pre(encode(Image.new("RGB", (40, 30)), "PNG"))   # one-time allocations happen before
    with open(path, "rb") as f:
        data = f.read()
    before, t0 = peak_kib(), time.perf_counter()
    try:
        pre(data, "img")
        outcome = "decoded"
    except ImageError as e:
        outcome = e.reason
    print(json.dumps({"outcome": outcome, "grew_kib": peak_kib() - before,
                      "seconds": time.perf_counter() - t0}))


def measure(path: str, policy: str, args) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, policy,
                           "--channels", str(args.channels), "--resolution", str(args.resolution)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"outcome": f"crashed ({done.returncode})", "grew_kib": float("nan"), "seconds": 0.0}
    return json.loads(done.stdout.strip().splitlines()[-1])


def declared_pixels(data: bytes) -> int:
    try:
        w, h = Image.open(io.BytesIO(data)).size
        return w * h
    except Exception:
        return 0


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--only", nargs="*", help="names (substrings) of the cases to run")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.channels, args.resolution)

    print(f"ImagePreprocessor({args.channels}, {args.resolution}); peak RSS growth of one call, "
          "fresh process per cell\n")
    header = (f"| {'case':40s} | {'bytes':>9s} | {'declared px':>11s} | {'old outcome':17s} | "
              f"{'old MiB':>8s} | {'new outcome':17s} | {'new MiB':>8s} | {'old/new':>7s} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in cases().items():
            if args.only and not any(s.lower() in name.lower() for s in args.only):
                continue
            data = build()
            if data is None:
                print(f"| {name:40s} | (skipped: needs jpegtran, from libjpeg-turbo) |")
                continue
            path = os.path.join(tmp, "image")
            with open(path, "wb") as f:
                f.write(data)
            old, new = measure(path, "old", args), measure(path, "new", args)
            # below 1 MiB counts as 1 MiB; both below: no ratio
            ratio = (f"{old['grew_kib'] / max(new['grew_kib'], 1024):7.1f}"
                     if max(old["grew_kib"], new["grew_kib"]) >= 1024 else "-")
            print(f"| {name:40s} | {len(data):9d} | {declared_pixels(data):11d} | {old['outcome']:17s} | "
                  f"{mib(old['grew_kib']):>8s} | {new['outcome']:17s} | {mib(new['grew_kib']):>8s} | "
                  f"{ratio:>7s} |", flush=True)


if __name__ == "__main__":
    main()
