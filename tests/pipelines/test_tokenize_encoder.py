"""CodeEncoder: its codes are `VQVAE.encode`'s at every position, whatever the batch size, on real
photographs with a barely trained (k-means-initialised) tokenizer, where near-ties are common;
the encoder has no search of its own (tokenizer/nearest.py decides every code)."""
from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from pipelines.tokenize.encoder import CodeEncoder
from tokenizer import VQVAE, VQVAEConfig
from tokenizer import nearest as nm

WALLPAPERS = "/usr/share/wallpapers/*/contents/images*/*.jpg"


def photo_crops(count: int = 512, seed: int = 0) -> np.ndarray:
    """(count, 3, 32, 32) uint8 crops of the system's wallpaper photographs, a few per photo;
    where none are installed, smooth random images (sums of blurred noise) stand in."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    files = sorted(glob.glob(WALLPAPERS))[::4][:16]
    crops = []
    for path in files:
        with Image.open(path) as raw:
            raw.draft("RGB", (raw.width // 8, raw.height // 8))   # JPEG: decode at 1/8 scale
            im = np.asarray(raw.convert("RGB"))
        for _ in range(-(-count // len(files))):
            y, x = rng.integers(0, im.shape[0] - 32), rng.integers(0, im.shape[1] - 32)
            crops.append(im[y:y + 32, x:x + 32].transpose(2, 0, 1))
    if not crops:
        low = rng.random((count, 3, 4, 4))
        smooth = low.repeat(8, axis=2).repeat(8, axis=3) + 0.1 * rng.random((count, 3, 32, 32))
        return (255 * smooth / smooth.max()).astype(np.uint8)
    return np.stack(crops[:count])


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as a tokenize worker runs (and many small calls stall less on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo_tokenizer(tmp_path_factory):
    """An RGB 32x32 tokenizer whose codebook is k-means-initialised on photo crops, untrained."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, resolution=32, hidden=32, res_hidden=32, code_dim=64))
    x = torch.from_numpy(photo_crops(128, seed=1)).float() / 255
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        model(x)                                   # k-means init of the codebook
    torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("tok"))
    model.eval().save_pretrained(path)
    return path


def nearest_fp32(z: torch.Tensor, book: torch.Tensor) -> np.ndarray:
    return nm.nearest_codes(z, book, exact=False).numpy()


def encode_in_batches(model: VQVAE, images: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(images).float() / 255
    return torch.cat([model.encode(x[i:i + size]) for i in range(0, len(x), size)]).reshape(
        len(x), -1).numpy()


def test_encode_equals_the_code_encoder_at_every_position(photo_tokenizer):
    images = photo_crops(512)
    enc = CodeEncoder(photo_tokenizer, device="cpu")
    got = enc.encode(images)                               # micro-batches of 64, last padded
    model = VQVAE.from_pretrained(photo_tokenizer)
    with torch.no_grad():
        flat = model.quantizer.search_vectors(model.encode_latents(torch.from_numpy(images) / 255.0))
    book = model.quantizer.search_codebook()
    assert nm.ambiguous_fraction(flat, book) > 0.001       # near-ties are really there
    # the float64 reference (expansion in float64: ~1e-16 relative, far below fp32's effects)
    z64, book64 = flat.double(), book.double()
    ref = (book64.pow(2).sum(1) - 2 * z64 @ book64.t()).argmin(1).reshape(got.shape).numpy()
    assert (nearest_fp32(flat, book).reshape(got.shape) != ref).sum() >= 1   # fp32 alone errs
    np.testing.assert_array_equal(got, ref)
    for size in (1, 7, 256):
        np.testing.assert_array_equal(encode_in_batches(model, images, size), got,
                                      err_msg=f"batch size {size}")
    order = np.random.default_rng(0).permutation(len(images))
    np.testing.assert_array_equal(enc.encode(images[order]), got[order])
