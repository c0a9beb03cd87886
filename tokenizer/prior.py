"""An autoregressive prior over a tokenizer's codes: a small causal transformer that reads the
h x w codes of an image in raster order and learns p(code_t | class, codes_<t).

Position 0 holds a start embedding: the class's (class-conditional prior) or one learned vector
(num_classes = 0), so the first code is predicted from the class alone. A prior directory is
config.json (the architecture, the weights' sha256 and free-form metadata, e.g. which tokenizer
made the codes) and model.safetensors, published atomically like a tokenizer directory.

Pure model code: nothing here imports pipelines, ray or torch.distributed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_state_dict, join_url, load_weights,
                         read_bytes, save_weights_bytes, weights_sha256, write_bytes_atomic)
from .config import ConfigError, check

PRIOR_FORMAT = "vqtok-prior"
PRIOR_FORMAT_VERSION = 1


@dataclass
class PriorConfig:
    codebook_size: int             # K of the tokenizer whose codes the prior models
    grid: tuple[int, int]          # (h, w): the sequence is h * w codes, row-major
    num_classes: int = 0           # 0 = unconditional
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        check(self.codebook_size >= 2, "prior.codebook_size", self.codebook_size, "must be >= 2")
        check(len(self.grid) == 2 and min(self.grid) >= 1, "prior.grid", self.grid,
              "must be two positive integers")
        check(self.num_classes >= 0, "model.num_classes", self.num_classes, "must be >= 0 (0 = unconditional)")
        for key in ("d_model", "layers", "heads", "mlp_ratio"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        check(self.d_model % self.heads == 0, "model.d_model", self.d_model,
              f"must be divisible by model.heads = {self.heads}")
        check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")

    @property
    def num_codes(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["grid"] = list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PriorConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"prior config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown key prior.{unknown[0]} (known: {', '.join(sorted(known))})")
        return cls(**data)


class Prior(nn.Module):
    """Decoder-only transformer over raster-order codes, pre-norm blocks, learned positions."""

    def __init__(self, config: PriorConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = PriorConfig.from_dict(config)
        self.config = config
        c = config
        self.tok = nn.Embedding(c.codebook_size, c.d_model)
        self.start = nn.Embedding(max(1, c.num_classes), c.d_model)   # the class, or one start vector
        self.pos = nn.Parameter(torch.zeros(c.num_codes, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, c.mlp_ratio * c.d_model, c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.codebook_size)
        nn.init.normal_(self.pos, std=0.02)

    @property
    def conditional(self) -> bool:
        return self.config.num_classes > 0

    def _start_ids(self, cls: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if not self.conditional:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if cls is None:
            raise ValueError("a class-conditional prior needs class ids")
        cls = cls.to(device=device, dtype=torch.long)
        if cls.shape != (batch,):
            raise ValueError(f"expected {batch} class ids, got shape {tuple(cls.shape)}")
        if batch and (int(cls.min()) < 0 or int(cls.max()) >= self.config.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.config.num_classes}); got "
                             f"[{int(cls.min())}, {int(cls.max())}]")
        return cls

    def forward(self, prefix: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """prefix (B, T') codes with T' < h * w, cls (B,) -> logits (B, T' + 1, K): position t's
        logits predict code t from the class and codes 0..t-1."""
        b, t = prefix.shape
        if t >= self.config.num_codes:
            raise ValueError(f"a prefix has at most {self.config.num_codes - 1} codes, got {t}")
        start = self.start(self._start_ids(cls, b, prefix.device))[:, None]       # (B, 1, D)
        x = torch.cat([start, self.tok(prefix)], dim=1) + self.pos[: t + 1]      # (B, T'+1, D)
        mask = nn.Transformer.generate_square_subsequent_mask(t + 1, device=x.device, dtype=x.dtype)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))

    def sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w), checked against the grid and the codebook -> (B, h * w) int64 in
        raster order: the targets; its first h * w - 1 codes are the prefix fed to forward."""
        h, w = self.config.grid
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ValueError(f"expected codes of shape (B, {h}, {w}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size})")
        return codes.reshape(len(codes), h * w).long()

    def nll(self, codes: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, w) -> (B, h * w) float32 negative log-likelihood of each code, in nats."""
        seq = self.sequence(codes)
        logits = self(seq[:, :-1], cls).float()                                    # (B, T, K)
        return F.cross_entropy(logits.transpose(1, 2), seq, reduction="none")

    def loss(self, codes: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code (nats) of a batch: the training loss."""
        seq = self.sequence(codes)
        return code_loss(self(seq[:, :-1], cls), seq)

    @torch.no_grad()
    def sample(self, n: int, cls: torch.Tensor | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n code grids (n, h, w) int64, one code at a time; temperature scales the logits
        (1 = the model's distribution, -> 0 the most likely code)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = self.pos.device
        self._start_ids(cls, n, device)
        seq = torch.zeros(n, 0, dtype=torch.long, device=device)
        for _ in range(self.config.num_codes):
            logits = self(seq, cls)[:, -1].float() / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)    # (n, 1)
            seq = torch.cat([seq, nxt], dim=1)
        return seq.reshape(n, *self.config.grid)

    # ---- prior directory ----------------------------------------------------------------------
    def weights_sha256(self) -> str:
        return weights_sha256(self.state_dict())

    def save_pretrained(self, path: str, metadata: dict | None = None) -> str:
        """Write `path/model.safetensors`, then `path/config.json` (architecture, weights sha256,
        `metadata`); -> the sha256."""
        state = self.state_dict()
        sha = weights_sha256(state)
        write_bytes_atomic(join_url(path, WEIGHTS_NAME),
                           save_weights_bytes(state, {"format": PRIOR_FORMAT, "sha256": sha}))
        config = {"format": PRIOR_FORMAT, "format_version": PRIOR_FORMAT_VERSION, "prior": self.config.to_dict(),
                  "weights_sha256": sha, "metadata": metadata or {}}
        write_bytes_atomic(join_url(path, CONFIG_NAME), json.dumps(config, indent=2).encode())
        return sha

    @classmethod
    def from_pretrained(cls, path: str, map_location: str | torch.device = "cpu") -> tuple["Prior", dict]:
        """-> (the prior in eval mode, the metadata it was saved with)."""
        raw = read_prior_config(path)
        weights_url = join_url(path, WEIGHTS_NAME)
        model = cls(raw["config"])
        state = load_weights(weights_url)
        check_state_dict(weights_url, model.state_dict(), state)
        model.load_state_dict(state)
        if raw["weights_sha256"] and model.weights_sha256() != raw["weights_sha256"]:
            raise CheckpointError(f"{weights_url}: sha256 of the weights does not match the "
                                  f"weights_sha256 in {join_url(path, CONFIG_NAME)}")
        return model.to(map_location).eval(), raw["metadata"]


def code_loss(logits: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per code) of logits (B, T, K) for the codes seq (B, T); float32
    whatever the logits' precision."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq.reshape(-1))


def read_prior_config(path: str) -> dict:
    """A prior directory's config.json -> {"config": PriorConfig, "weights_sha256", "metadata"};
    CheckpointError naming the file for anything else (a tokenizer directory, say)."""
    url = join_url(path, CONFIG_NAME)
    try:
        raw = json.loads(read_bytes(url))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != PRIOR_FORMAT or "prior" not in raw:
        raise CheckpointError(f"{url}: not a vqtok prior directory (a `vqtok prior train` run's final/)")
    if raw.get("format_version", 0) > PRIOR_FORMAT_VERSION:
        raise CheckpointError(f"{url}: written by a newer vqtok (prior format {raw['format_version']}); "
                              "upgrade vqtok")
    try:
        config = PriorConfig.from_dict(raw["prior"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{url}: {e}") from None
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{url}: 'metadata' must be a JSON object")
    return {"config": config, "weights_sha256": raw.get("weights_sha256"), "metadata": metadata}
