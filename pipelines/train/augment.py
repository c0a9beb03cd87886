"""Training augmentation: random flips, 90-degree turns, crop-and-scale jitter and channel order,
applied to a whole batch on its device as one affine resampling.

Each image gets one 2x3 affine map (flip signs, a turn, a crop side s and offset) and one
`grid_sample`; without crop jitter the maps only permute pixel centres, so flips and turns move
pixels exactly. A crop of side s < 1 (a fraction of the image side) at a random position is
scaled back up to the full size (bilinear): the model sees each texture at more scales than the
crops were cut at.

The draws come from a generator seeded by (seed, rank, step), so a resumed run augments its
remaining steps as the uninterrupted run would, and ranks never draw alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenizer.config import check


@dataclass
class AugmentConfig:
    flip: bool = False             # horizontal and vertical flips, each with probability 1/2
    rot90: bool = False            # a turn by 0, 90, 180 or 270 degrees (square images)
    min_crop_area: float = 1.0     # crop a random square of >= this fraction of the area, rescale; 1 = off
    crop_prob: float = 1.0         # the fraction of images that get the crop (the rest keep their pixels)
    channel_shuffle: bool = False  # a random order of the colour channels (RGB only)

    def __post_init__(self):
        check(0.0 < self.min_crop_area <= 1.0, "data.augment.min_crop_area", self.min_crop_area,
              "must be in (0, 1] (1 turns crop jitter off)")
        check(0.0 <= self.crop_prob <= 1.0, "data.augment.crop_prob", self.crop_prob, "must be in [0, 1]")

    @property
    def moves_pixels(self) -> bool:
        return self.flip or self.rot90 or self.crops

    @property
    def crops(self) -> bool:
        return self.min_crop_area < 1.0 and self.crop_prob > 0

    @property
    def enabled(self) -> bool:
        return self.moves_pixels or self.channel_shuffle


def augment_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator for one rank's batch at one step (independent of any global RNG)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_033 + step)


def affine_maps(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) fp32 maps from output to input coordinates ([-1, 1], as affine_grid takes)."""
    sx = torch.ones(n)
    sy = torch.ones(n)
    if cfg.flip:
        sx = torch.where(torch.rand(n, generator=gen) < 0.5, -sx, sx)
        sy = torch.where(torch.rand(n, generator=gen) < 0.5, -sy, sy)
    turns = torch.randint(0, 4, (n,), generator=gen) if cfg.rot90 else torch.zeros(n, dtype=torch.long)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns]      # exact for multiples of 90 degrees
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns]
    side = torch.ones(n)
    if cfg.crops:
        area = cfg.min_crop_area + (1 - cfg.min_crop_area) * torch.rand(n, generator=gen)
        side = area.sqrt()
        # a scaled crop is a bilinear resampling, a blur: images left whole keep the sharp pixels
        # that held-out photographs have (drawn only when used, so crop_prob 1 replays old runs)
        if cfg.crop_prob < 1.0:
            side = torch.where(torch.rand(n, generator=gen) < cfg.crop_prob, side, torch.ones(n))
    # the crop's centre may sit anywhere that keeps the crop inside the image
    shift = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1)
    maps = torch.zeros(n, 2, 3)
    maps[:, 0, 0], maps[:, 0, 1] = side * cos * sx, -side * sin * sy
    maps[:, 1, 0], maps[:, 1, 1] = side * sin * sx, side * cos * sy
    maps[:, :, 2] = shift
    return maps


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """x: (B, C, H, W) float -> the same shape, each image transformed by its own draw."""
    if not cfg.enabled:
        return x
    b, c, h, w = x.shape
    if cfg.rot90 and h != w:
        raise ValueError(f"data.augment.rot90 needs square images, got {h}x{w}")
    maps = affine_maps(b, cfg, gen)
    if cfg.channel_shuffle and c > 1:
        order = torch.rand(b, c, generator=gen).argsort(dim=1)           # (B, C)
        x = x.gather(1, order.to(x.device)[:, :, None, None].expand(b, c, h, w))
    if cfg.moves_pixels:
        grid = F.affine_grid(maps.to(x.device, x.dtype), [b, c, h, w], align_corners=False)
        # border padding: bilinear taps at the edge of a full-size map stay inside the image
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x
