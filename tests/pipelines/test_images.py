"""The one image policy (pipelines/images.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tok_data as td
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
