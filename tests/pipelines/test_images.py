"""The one image policy (pipelines/images.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile, TiffImagePlugin

import tok_data as td
from crafted_images import (bmp_rle8_declaring, gif_declaring, jpeg_declaring, png_declaring,
                            progressive_jpeg_declaring, tiff_declaring)
from pipelines import images
from pipelines.images import ImageError, ImagePreprocessor


def test_preprocess_converts_odd_modes_by_the_documented_policy():
    grey = ImagePreprocessor(1, 28)
    # 16-bit grey: 65535 -> 255, 257 -> 1
    a16 = np.full((28, 28), 257, np.uint16)
    a16[0, 0] = 65535
    out = grey(td.png(a16))
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[0, 5, 5] == 1
    # fully transparent RGBA is composited over white
    clear = np.zeros((28, 28, 4), np.uint8)
    assert (grey(td.encode_image(Image.fromarray(clear), "PNG")) == 255).all()
    # CMYK and palette end up as Pillow's own conversion to L
    photo = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    cmyk = Image.fromarray(photo).convert("CMYK")
    assert np.array_equal(grey(td.encode_image(cmyk, "TIFF"))[0], np.asarray(cmyk.convert("RGB").convert("L")))
    rgb = ImagePreprocessor(3, 28)(td.png(photo))
    assert rgb.shape == (3, 28, 28) and np.array_equal(rgb.transpose(1, 2, 0), photo)


def test_preprocess_resizes_shorter_side_and_centre_crops():
    wide = np.zeros((28, 84), np.uint8)
    wide[:, 28:56] = 200             # only the centre third is bright
    out = ImagePreprocessor(1, 28)(td.png(wide))[0]
    assert out.shape == (28, 28)
    assert out[:, 3:-3].min() >= 190  # the crop is the bright centre
    tall = np.zeros((112, 56), np.uint8)
    tall[28:84] = 255                 # 56x112 -> 28x56 -> centre 28 rows are the bright band
    out = ImagePreprocessor(1, 28)(td.png(tall))[0]
    assert out[2:-2].min() >= 250


def test_preprocess_applies_exif_orientation():
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :40] = 255                # left half white
    exif = Image.Exif()
    exif[0x0112] = 6                 # display rotated 90 degrees clockwise: white goes on top
    data = td.encode_image(Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    out = ImagePreprocessor(1, 40)(data)[0]   # displayed 40x80 (w x h) -> 40x40 centre crop
    rotated = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))
    assert rotated.shape == (80, 40)
    assert out[:15].mean() > 200 and out[-15:].mean() < 50   # top white, bottom black


@pytest.mark.parametrize("data,reason", [(b"", "empty_image"), (b"\x89PNG\r\n\x1a\nxxxx", "undecodable_image"),
                                         (b"GIF89a" + b"\0" * 10, "undecodable_image")])
def test_preprocess_rejects_bad_bytes_with_a_reason(data, reason):
    with pytest.raises(ImageError) as e:
        ImagePreprocessor(1, 28)(data, "png")
    assert e.value.reason == reason and "'png'" in str(e.value)


# -- memory: bounded by the output size and by the encoded bytes --------------------------------

PEAK_RSS_SCRIPT = """
import json, sys
from pipelines.images import ImagePreprocessor
def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
data = open(sys.argv[1], "rb").read()
pre = ImagePreprocessor(3, 32)
pre(open(sys.argv[2], "rb").read())       # a small image first: one-time allocations
before = peak_kib()
out = pre(data)
grew = peak_kib() - before
print(json.dumps({"grew_kib": grew, "min": int(out.min()), "max": int(out.max()), "shape": out.shape}))
"""


def peak_rss_growth(tmp_path, data: bytes) -> dict:
    """Decode `data` at 32x32 RGB in a fresh interpreter; its peak RSS growth and the result.
    Pillow allocates outside Python's allocator, so tracemalloc would not see it; and the
    process's VmHWM, unlike ru_maxrss, does not start at the forking parent's size."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    image, small = td.write(tmp_path / "image", data), td.write(tmp_path / "small.png", td.png(np.zeros((8, 8), np.uint8)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, image, small], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")


@needs_proc
@pytest.mark.parametrize("size", [(200_000, 1), (1, 400_000)])
def test_long_thin_image_costs_memory_by_its_output_not_by_its_aspect_ratio(tmp_path, size):
    # a grey ramp along the long side: the centre crop is the middle of the ramp, ~128
    ramp = (np.arange(max(size)) * 256 // max(size)).astype(np.uint8)
    data = td.png(ramp.reshape(size[1], size[0]))
    got = peak_rss_growth(tmp_path, data)
    assert got["shape"] == [3, 32, 32] and 126 <= got["min"] <= got["max"] <= 129
    assert got["grew_kib"] < 64 * 1024      # resizing the whole image first took gigabytes


@needs_proc
def test_16_bit_grey_is_brought_to_8_bit_without_float64_copies_of_the_image(tmp_path):
    a16 = np.zeros((4000, 4000), np.uint16)
    a16[::7] = 40000                     # 1/7 of the rows at 40000 -> 156: the mean is ~22
    got = peak_rss_growth(tmp_path, td.png(a16))
    assert 21 <= got["min"] <= got["max"] <= 24
    # the decoded 16-bit image, its array and the 8-bit results: well under 12 bytes a pixel
    # (three whole-image float64 temporaries alone were 24)
    assert got["grew_kib"] < 12 * 4000 * 4000 / 1024


@pytest.mark.parametrize("build,side", [
    (png_declaring, 9000), (gif_declaring, 9000), (bmp_rle8_declaring, 9000), (tiff_declaring, 9000),
    (jpeg_declaring, 9000),
    # its draft at 32x32 would decode 1000x1000, within the floor; but a progressive JPEG holds
    # DCT coefficients for all its declared pixels, whatever the draft
    (progressive_jpeg_declaring, 8000)])
def test_tiny_file_declaring_many_pixels_is_refused_before_decoding(monkeypatch, build, side):
    loads = []
    for cls in (ImageFile.ImageFile, TiffImagePlugin.TiffImageFile):
        monkeypatch.setattr(cls, "load", lambda self, *a, _real=cls.load: loads.append(self) or _real(self, *a))
    data = build(side, side)          # tens of M pixels (below Pillow's own bomb limit) in < 1 KB
    assert len(data) < 1024 and Image.open(io.BytesIO(data)).size == (side, side)
    loads.clear()
    with pytest.raises(ImageError) as e:
        ImagePreprocessor(3, 32)(data, "img")
    assert e.value.reason == "image_too_large", e.value
    assert f"{side}x{side}" in str(e.value) and f"{len(data)} bytes" in str(e.value) and "limit" in str(e.value)
    assert loads == []                # refused from the header: nothing decoded or allocated


def test_pixel_budget_follows_the_encoded_bytes():
    assert images.pixel_budget(10) == images.PIXEL_FLOOR
    assert images.pixel_budget(50_000) == 50_000 * images.PIXELS_PER_BYTE
    assert images.pixel_budget(1 << 40) == images.MAX_PIXELS
    # every image of up to PIXEL_FLOOR pixels gets past the budget however small its file
    # (this one then fails as the truncated data it is); one row more does not
    with pytest.raises(ImageError) as e:
        ImagePreprocessor(1, 32)(png_declaring(1024, 1024))
    assert e.value.reason == "undecodable_image"
    with pytest.raises(ImageError) as e:
        ImagePreprocessor(1, 32)(png_declaring(1024, 1025))
    assert e.value.reason == "image_too_large"
