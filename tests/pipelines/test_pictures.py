"""pipelines/pictures.py: PNG bytes and grids."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.pictures import comparison_grid, image_grid, png_bytes, to_uint8, usage_histogram


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img)


def test_png_bytes_round_trip_grey_and_rgb_with_torch_rounding():
    g = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        x = torch.rand(channels, 5, 7, generator=g) * 1.2 - 0.1           # some values outside [0, 1]
        want = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()     # (C, H, W)
        got = decode_png(png_bytes(x))
        assert got.shape == ((5, 7) if channels == 1 else (5, 7, 3))
        np.testing.assert_array_equal(got, want[0] if channels == 1 else want.transpose(1, 2, 0))
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)                   # uint8 (H, W) as is
    np.testing.assert_array_equal(decode_png(png_bytes(arr)), arr)
    assert to_uint8(torch.full((1, 2, 2), 0.5, dtype=torch.bfloat16)).tolist() == [[128, 128], [128, 128]]


def test_image_grid_places_scaled_tiles_in_rows():
    black, white = torch.zeros(1, 8, 8), torch.ones(1, 8, 8)
    grid = np.asarray(image_grid([[black, white, black], [white]], pad=2, min_tile=16))
    # tiles scaled x2 to 16 px; 3 columns and 2 rows, 2 px apart and around
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    assert (grid[2:18, 2:18] == 0).all() and (grid[2:18, 20:36] == 255).all()
    assert (grid[20:36, 2:18] == 255).all()                 # second row's only tile
    assert (grid[0:2] == 255).all() and (grid[18:20] == 255).all()   # white padding


def test_comparison_grid_puts_reconstructions_below_their_originals():
    originals = [torch.full((3, 4, 4), i / 10) for i in range(10)]
    recons = [torch.full((3, 4, 4), 1 - i / 10) for i in range(10)]
    grid = np.asarray(comparison_grid(originals, recons, per_row=8))
    side = 64                                                # 4 px tiles scaled x16
    assert grid.shape == (4 * (side + 2) + 2 + 4, 8 * (side + 2) + 2, 3)
    band2 = 2 * (side + 2) + 4 + 2                           # second band after the extra gap
    assert grid[2, 2, 0] == round(0.0 * 255) and grid[side + 4, 2, 0] == 255      # 0 over 1 - 0
    assert grid[band2, 2 + side + 2, 0] == round(0.9 * 255)  # 10th original: band 2, column 2
    assert grid[band2 + side + 2, 2 + side + 2, 0] == round(0.1 * 255)


def test_usage_histogram_draws_bars_for_used_codes():
    img = usage_histogram(torch.tensor([5, 0, 1, 0]), "title")
    arr = np.asarray(img)
    assert img.size[0] >= 200 and arr.ndim == 3
    assert (arr == np.array([70, 130, 180], dtype=np.uint8)).all(-1).any()    # steelblue bars


def test_empty_grid_is_an_error():
    with pytest.raises(ValueError):
        image_grid([[]])
