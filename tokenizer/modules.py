"""Encoder and decoder of the paper: stride-2 4x4 convs, residual blocks (ReLU, 3x3, ReLU, 1x1)."""
from __future__ import annotations

from torch import nn

from .config import VQVAEConfig


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        # the first ReLU must keep x for the skip; the second may overwrite the conv's output,
        # which the conv's backward does not need (one activation less to write and keep)
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


def _res_stack(cfg: VQVAEConfig, blocks: int) -> list[nn.Module]:
    return [ResidualBlock(cfg.hidden, cfg.res_hidden) for _ in range(blocks)]


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, D, H / 2**n, W / 2**n)"""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        channels = cfg.in_channels
        for i in range(cfg.num_downsamples):
            width = cfg.hidden if i == cfg.num_downsamples - 1 else cfg.outer_width
            layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers += [nn.Conv2d(channels, cfg.hidden, 3, padding=1)]
        layers += _res_stack(cfg, cfg.num_res_blocks)
        layers += [nn.ReLU(inplace=True), nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, h * 2**n, w * 2**n), mirrors the encoder with transposed convs;
    `decoder_res_blocks` may give it more residual blocks than the encoder (it has to draw the
    detail that the codes leave out)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1)]
        layers += _res_stack(cfg, cfg.decoder_blocks)
        layers += [nn.ReLU(inplace=True)]
        channels = cfg.hidden
        for i in range(cfg.num_downsamples):
            last = i == cfg.num_downsamples - 1
            width = cfg.in_channels if last else cfg.outer_width
            layers += [nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1)]
            if not last:
                layers += [nn.ReLU(inplace=True)]
            channels = width
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)
