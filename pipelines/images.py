"""Image bytes -> the tokenizer's input, by one documented policy (PREPROCESSING).

1. decode with Pillow; refuse empty bytes, undecodable or truncated data, and images above
   MAX_PIXELS (decompression bombs);
2. apply the EXIF orientation;
3. bring any mode to 8-bit: 16-bit/32-bit integer grey is scaled by 1/257 (65535 -> 255), float
   grey is clipped from [0, 1], CMYK/YCbCr/LAB/HSV -> RGB, palette -> RGB(A), 1-bit -> grey;
   transparency is composited over white;
4. convert to the tokenizer's channels (1: ITU-R 601-2 luma "L", 3: RGB);
5. resize so the shorter side equals the resolution (bicubic, antialiased), then centre-crop to
   resolution x resolution (odd excess: the extra pixel is cut from the right/bottom).
Large JPEGs are decoded at a reduced DCT scale that is still >= the target (Pillow's draft),
which is deterministic for a given file.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_PIXELS = 1 << 28      # 268 M pixels (e.g. 16k x 16k); larger images are error rows
PREPROCESSING = {
    "policy": "exif-orientation; to-8bit; alpha-over-white; to-channels; "
              "shorter-side-resize(bicubic); centre-crop",
    "version": 1,
}
IMAGE_EXTS = ("png", "jpg", "jpeg", "jpe", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm",
              "pbm", "pnm", "jp2")


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageError(ValueError):
    """A sample's image cannot be used; `reason` is a short category for the manifest, `found`
    what was found where a strict preprocessor refused a mismatch ((channels, mode) or (w, h))."""

    def __init__(self, reason: str, message: str, found=None):
        super().__init__(message)
        self.reason = reason
        self.found = found


def native_channels(img: Image.Image) -> int:
    """1 for grey modes, 3 for everything else (RGB, palette, CMYK, ...)."""
    return 1 if img.mode in GREY_MODES else 3


def is_image_field(ext: str) -> bool:
    """'png', 'left.png' -> True: a field find_image may pick."""
    return ext in IMAGE_EXTS or ext.rsplit(".", 1)[-1] in IMAGE_EXTS


def find_image(fields: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The image member of a sample: the first of IMAGE_EXTS present (also 'left.png'-style)."""
    for ext in IMAGE_EXTS:
        if ext in fields:
            return ext, fields[ext]
    for name, data in fields.items():
        if name.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return name, data
    return None


class ImagePreprocessor:
    """bytes -> (C, R, R) uint8 following PREPROCESSING. strict=True refuses images whose own
    channel count or size differ from (channels, resolution) instead of converting them
    (reasons 'channel_mismatch', 'size_mismatch'): for training data that must already match."""

    def __init__(self, channels: int, resolution: int, strict: bool = False):
        self.channels = channels
        self.mode = "L" if channels == 1 else "RGB"
        self.resolution = resolution
        self.strict = strict

    def __call__(self, data: bytes, ext: str = "image") -> np.ndarray:
        img = self.decode(data, ext)
        try:
            arr = np.asarray(self._resize_crop(img), dtype=np.uint8)
        except Exception as e:
            raise ImageError("undecodable_image", f"image in '{ext}' cannot be converted: {e}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)   # (C, R, R)
        return np.ascontiguousarray(arr)

    def decode(self, data: bytes, ext: str = "image", draft: bool = True) -> Image.Image:
        """Steps 1-4 of the policy: a PIL image in the tokenizer's mode, at its stored size
        (a large JPEG at a reduced DCT scale still >= the resolution unless draft=False)."""
        if not data:
            raise ImageError("empty_image", f"empty image bytes in '{ext}'")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                self._check_size(img, ext)
                if self.strict:                  # the stored size and mode, before any draft
                    self._check_native(img, ext)
                if draft:
                    self._draft(img)
                img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("image_too_large", f"image in '{ext}' is too large ({e})") from None
        except UnidentifiedImageError:   # its message holds a memory address: not reproducible
            raise ImageError("undecodable_image", f"undecodable image in '{ext}': not a known "
                             "image format") from None
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error...
            raise ImageError("undecodable_image", f"undecodable image in '{ext}': {e}") from None
        try:
            return self._to_mode(_exif_transpose(img))
        except Exception as e:
            raise ImageError("undecodable_image", f"image in '{ext}' cannot be converted: {e}") from None

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Step 5: shorter side to the resolution, then the centre square."""
        return self._resize_crop(img)

    def _check_size(self, img: Image.Image, ext: str) -> None:
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError("undecodable_image", f"image in '{ext}' has size {w}x{h}")
        if w * h > MAX_PIXELS:
            raise ImageError("image_too_large", f"image in '{ext}' has {w}x{h} pixels "
                             f"(limit {MAX_PIXELS})")

    def _check_native(self, img: Image.Image, ext: str) -> None:
        native = native_channels(img)
        if native != self.channels:
            raise ImageError("channel_mismatch", f"image in '{ext}' has {native} channel(s) "
                             f"({img.mode}), not {self.channels}", found=(native, img.mode))
        if img.size != (self.resolution, self.resolution):
            raise ImageError("size_mismatch", f"image in '{ext}' is {img.size[0]}x{img.size[1]}, "
                             f"not {self.resolution}x{self.resolution}", found=img.size)

    def _draft(self, img: Image.Image) -> None:
        if img.format == "JPEG":
            w, h = img.size
            scale = self.resolution / min(w, h)
            img.draft(img.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))

    def _to_mode(self, img: Image.Image) -> Image.Image:
        mode = img.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            img = _high_depth_to_l(img)
        elif mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in ("PA",):
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "La", "RGBa"):
            img = _over_white(img)
        if img.mode != self.mode:
            img = img.convert(self.mode)
        return img

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


# where Pillow's getexif() looks for an orientation; an image with none of them has none
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _exif_transpose(img: Image.Image) -> Image.Image:
    if not hasattr(img, "tag_v2") and not any(k in img.info for k in ORIENTATION_SOURCES):
        return img    # the common case, without exif_transpose's parse and copy
    try:
        return ImageOps.exif_transpose(img)
    except Exception:   # malformed EXIF: keep the stored orientation
        return img


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0
    else:
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
