"""Small image files that declare far more pixels than their bytes hold: the decompression
bombs the image policy must refuse from the header (tests/pipelines/test_images.py and
benchmarks/hostile_memory.py build them from here). Only PIL, struct and zlib: the benchmark's
memory measurements import it too."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(w: int, h: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def gif_declaring(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00;")


def bmp_rle8_declaring(w: int, h: int) -> bytes:
    palette, rle = b"\0\0\0\0\xff\xff\xff\0", b"\x00\x01"          # two colours; end of bitmap
    offset = 14 + 40 + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(rle), 2835, 2835, 2, 0) + palette + rle)


def tiff_declaring(w: int, h: int) -> bytes:
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, h), (279, 4, 4)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, typ, 1, v) for t, typ, v in tags)
    return b"II*\0" + struct.pack("<I", 12) + b"\0\0\0\0" + ifd + b"\0\0\0\0"


def jpeg_declaring(w: int, h: int, progressive: bool = False) -> bytes:
    data = bytearray(encode_image(Image.new("L", (8, 8)), "JPEG", progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def progressive_jpeg_declaring(w: int, h: int) -> bytes:
    return jpeg_declaring(w, h, progressive=True)
