"""Image bytes -> the tokenizer's input, by one documented policy (PREPROCESSING).

1. decode with Pillow; refuse empty bytes, undecodable or truncated data, and images that
   declare more pixels than pixel_budget(bytes): MAX_PIXELS, and for small files at most
   max(PIXEL_FLOOR, PIXELS_PER_BYTE x the file's bytes) (decompression bombs; checked from the
   header, before anything is allocated);
2. apply the EXIF orientation;
3. bring any mode to 8-bit: 16-bit/32-bit integer grey is scaled by 1/257 (65535 -> 255), float
   grey is clipped from [0, 1], CMYK/YCbCr/LAB/HSV -> RGB, palette -> RGB(A), 1-bit -> grey;
   transparency is composited over white;
4. convert to the tokenizer's channels (1: ITU-R 601-2 luma "L", 3: RGB);
5. the centre square of the image scaled so that its shorter side equals the resolution
   (bicubic, antialiased; odd excess: the extra pixel is cut from the right/bottom), computed
   by resampling only that square's box of the source straight to resolution x resolution, so
   memory follows the output size and not the image's aspect ratio.
Large JPEGs are decoded at a reduced DCT scale that is still >= the target (Pillow's draft),
which is deterministic for a given file.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
# the most pixels any image may have: Pillow's own decompression-bomb limit (its warning is an
# error here), checked first so that the error row says so plainly
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# An image may decode to at most max(PIXEL_FLOOR, PIXELS_PER_BYTE x its encoded bytes) pixels
# (and never more than MAX_PIXELS), checked from the header before anything is allocated, so that
# a few bytes cannot claim gigabytes. Deflate expands at most about 1032:1, so 1024 pixels per
# byte is about the densest an 8-bit PNG can be; photographs and drawings are far below it. Past
# it are blank or synthetic images (a uniform 1-bit scan, an LZW, run-length or arithmetic-coded
# bomb), and every image of up to PIXEL_FLOOR (1024 x 1024) pixels passes whatever its size.
PIXEL_FLOOR = 1 << 20
PIXELS_PER_BYTE = 1024
RESIZE_REDUCING_GAP = 3.0  # block-average down to <= 3x the output first (Pillow's reducing_gap)
PREPROCESSING = {
    "policy": "exif-orientation; to-8bit; alpha-over-white; to-channels; "
              "centre-square-of-shorter-side-resize(bicubic, reducing-gap 3); "
              "pixels <= max(2**20, 1024 x bytes)",
    "version": 2,
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
                self._check_budget(img, len(data), ext)   # from the header, before load() allocates
                if self.strict:                  # the stored size and mode, before any draft
                    self._check_native(img, ext)
                if draft:
                    self._draft(img)
                img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("image_too_large", f"image in '{ext}' ({len(data)} bytes) is too large "
                             f"({e})") from None
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

    def _check_budget(self, img: Image.Image, nbytes: int, ext: str) -> None:
        """Refuse an image that declares more pixels than its bytes may (pixel_budget). The
        declared size also for JPEG, whose draft decodes fewer: a progressive or multi-scan JPEG
        still holds coefficients for every pixel, and no Huffman-coded JPEG comes near the budget."""
        w, h = img.size
        limit = pixel_budget(nbytes)
        if w * h > limit:
            raise ImageError("image_too_large", f"image in '{ext}' declares {w}x{h} = {w * h} pixels "
                             f"in {nbytes} bytes; the limit is {limit} pixels (max({PIXEL_FLOOR}, "
                             f"{PIXELS_PER_BYTE} per byte), at most {MAX_PIXELS})")

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
        if (w, h) == (r, r):
            return img
        box, (rw, rh) = centre_square_box(w, h, r)
        if min(w, h) == r:                  # scale 1: the square is whole source pixels
            return img.crop(tuple(round(v) for v in box))
        # Block-average first when shrinking a lot, as Pillow's reducing_gap does for a whole
        # image, but with the blocks on the same grid as the whole image's (origin 0, 0): the
        # result then matches resizing the whole image and cropping.
        fx, fy = int(w / rw / RESIZE_REDUCING_GAP) or 1, int(h / rh / RESIZE_REDUCING_GAP) or 1
        if fx > 1 or fy > 1:
            area = _block_aligned(_support_box(box, r, w, h), fx, fy, w, h)
            img = img.reduce((fx, fy), box=area)
            box = ((box[0] - area[0]) / fx, (box[1] - area[1]) / fy,
                   (box[2] - area[0]) / fx, (box[3] - area[1]) / fy)
        return img.resize((r, r), Image.Resampling.BICUBIC, box=box)


def pixel_budget(nbytes: int) -> int:
    """The most pixels an encoded image of nbytes may decode to (see PIXELS_PER_BYTE)."""
    return min(MAX_PIXELS, max(PIXEL_FLOOR, PIXELS_PER_BYTE * nbytes))


def centre_square_box(w: int, h: int, r: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The source box (left, top, right, bottom) of the r x r centre crop of a w x h image scaled
    so that its shorter side is r, and that scaled size: the box resized to r x r is the crop."""
    scale = r / min(w, h)
    rw, rh = max(r, round(w * scale)), max(r, round(h * scale))
    left, top = (rw - r) // 2, (rh - r) // 2
    sx, sy = w / rw, h / rh
    return (left * sx, top * sy, (left + r) * sx, (top + r) * sy), (rw, rh)


BICUBIC_SUPPORT = 2.0    # output pixels either side of a sample that bicubic reads


def _support_box(box, r: int, w: int, h: int) -> tuple[int, int, int, int]:
    """Whole source pixels around `box` that cover what resampling it to r x r reads, with one
    more output pixel's worth of margin for the rounding of the reduced grid."""
    mx = (BICUBIC_SUPPORT + 1) * max(1.0, (box[2] - box[0]) / r) + 1
    my = (BICUBIC_SUPPORT + 1) * max(1.0, (box[3] - box[1]) / r) + 1
    return (max(0, math.floor(box[0] - mx)), max(0, math.floor(box[1] - my)),
            min(w, math.ceil(box[2] + mx)), min(h, math.ceil(box[3] + my)))


def _block_aligned(area, fx: int, fy: int, w: int, h: int) -> tuple[int, int, int, int]:
    """`area` grown to whole fx x fy blocks of the grid that starts at (0, 0)."""
    return (area[0] // fx * fx, area[1] // fy * fy,
            min(w, -(-area[2] // fx) * fx), min(h, -(-area[3] // fy) * fy))


# where Pillow's getexif() looks for an orientation; an image with none of them has none
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _exif_transpose(img: Image.Image) -> Image.Image:
    if not hasattr(img, "tag_v2") and not any(k in img.info for k in ORIENTATION_SOURCES):
        return img    # the common case, without exif_transpose's parse and copy
    try:
        return ImageOps.exif_transpose(img)
    except Exception:   # malformed EXIF: keep the stored orientation
        return img


HIGH_DEPTH_CHUNK = 1 << 16    # pixels converted at a time: bounds the float64 temporaries


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey -> 8-bit L, a band of rows at a time so that the float64 arithmetic costs
    a fixed amount on top of the source and the uint8 result."""
    src = np.asarray(img)
    out = np.empty(src.shape, np.uint8)
    rows = max(1, HIGH_DEPTH_CHUNK // max(1, src.shape[1]))
    for y in range(0, src.shape[0], rows):
        arr = src[y:y + rows].astype(np.float64)
        if img.mode == "F":
            arr = np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0
        else:
            arr /= 257.0
        out[y:y + rows] = np.clip(np.rint(arr), 0, 255)
    return Image.fromarray(out, "L")


def _over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
