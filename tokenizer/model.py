"""VQ-VAE: encoder -> quantiser (vector or finite scalar) -> decoder, with a tokenizer directory
format."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError, check_state_dict,
                         join_url, load_weights, read_bytes, save_weights_bytes, weights_sha256,
                         write_bytes_atomic)
from .collectives import Collectives
from .config import ConfigError, VQVAEConfig
from .modules import Decoder, Encoder
from .fsq import FiniteScalarQuantizer
from .quantizer import VectorQuantizer


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig | dict | None = None, collectives: Collectives | None = None):
        """`collectives` keeps the quantiser's codebook identical across data-parallel replicas
        (the training stage passes `pipelines.distributed.quantizer_collectives()`)."""
        super().__init__()
        if config is None:
            config = VQVAEConfig()
        elif isinstance(config, dict):
            config = VQVAEConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(config)
        quantizer = FiniteScalarQuantizer if config.quantizer.kind == "fsq" else VectorQuantizer
        self.quantizer = quantizer(config.quantizer, config.code_dim, collectives)
        self.decoder = Decoder(config)
        # oneDNN's fast conv layout, for every model however it was made (trained or loaded), so
        # that all give bit-identical results (and oneDNN's fastest convolutions on CPU)
        self.to(memory_format=torch.channels_last)

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    def _check_input(self, x: torch.Tensor) -> None:
        c, r = self.config.in_channels, self.config.resolution
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"expected images of shape (B, {c}, {r}, {r}) in [0, 1], got {tuple(x.shape)}")

    # images are centred to [-0.5, 0.5] inside the model; the API speaks [0, 1]
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, h, w, D) encoder outputs."""
        self._check_input(x)
        return self.encoder(x - 0.5).permute(0, 2, 3, 1)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, C, H, W), unclamped, centred at 0.5."""
        return self.decoder(z_q.permute(0, 3, 1, 2)) + 0.5

    def forward(self, x: torch.Tensor):
        """Training forward: (reconstruction (B, C, H, W), codes (B, h, w), losses dict)."""
        z_e = self.encode_latents(x)
        z_q, codes, losses = self.quantizer(z_e)
        x_hat = self.decode_latents(z_q)
        losses = {"reconstruction": F.mse_loss(x_hat.float(), x.float()), **losses}
        return x_hat, codes, losses

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, h, w) int64 codes. A sample's codes do not depend
        on the batch it comes in: the search is exact (tokenizer/nearest.py), and a lone image is
        encoded as a batch of two, because oneDNN convolves a batch of one with another
        algorithm whose latents differ in the last bit (every larger batch agrees)."""
        self._check_input(x)
        if x.shape[0] == 1:
            return self.quantizer.nearest(self.encode_latents(x.expand(2, *x.shape[1:])))[:1]
        return self.quantizer.nearest(self.encode_latents(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 -> (B, C, H, W) float in [0, 1]."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"decode expects integer codes, got {codes.dtype}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.decode_latents(self.quantizer.lookup(codes)).clamp(0, 1)

    # ---- tokenizer directory ----------------------------------------------------------------------
    def weights_sha256(self) -> str:
        return weights_sha256(self.state_dict())

    def save_pretrained(self, path: str) -> str:
        """Write `path/config.json` and `path/model.safetensors` (local path or fsspec URL)."""
        state = self.state_dict()
        sha = weights_sha256(state)
        meta = {"format": "vqtok", "version": str(FORMAT_VERSION), "sha256": sha}
        write_bytes_atomic(join_url(path, WEIGHTS_NAME), save_weights_bytes(state, meta))
        config = {"format_version": FORMAT_VERSION, "model": self.config.to_dict(), "weights_sha256": sha}
        write_bytes_atomic(join_url(path, CONFIG_NAME), json.dumps(config, indent=2).encode())
        return sha

    @classmethod
    def from_pretrained(cls, path_or_url: str, map_location: str | torch.device = "cpu") -> "VQVAE":
        config_url = join_url(path_or_url, CONFIG_NAME)
        weights_url = join_url(path_or_url, WEIGHTS_NAME)
        try:
            raw = json.loads(read_bytes(config_url))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_url}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or "model" not in raw:
            raise CheckpointError(f"{config_url}: no 'model' section; not a vqtok tokenizer directory")
        try:
            config = VQVAEConfig.from_dict(raw["model"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{config_url}: {e}") from None
        model = cls(config)
        state = load_weights(weights_url)
        check_state_dict(weights_url, model.state_dict(), state)
        model.load_state_dict(state)
        expected_sha = raw.get("weights_sha256")
        if expected_sha and model.weights_sha256() != expected_sha:
            raise CheckpointError(f"{weights_url}: sha256 of the weights does not match the "
                                  f"weights_sha256 in {config_url}; the directory is inconsistent")
        return model.to(map_location).eval()
