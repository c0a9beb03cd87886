"""Model configuration: one typed dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A configuration value a user set is invalid; the message names the key."""


@dataclass
class QuantizerConfig:
    # vq: nearest-code vector quantisation (the paper); fsq: finite scalar quantisation (Mentzer
    # et al. 2024), set by `levels`, with no codebook loss; it ignores the VQ-only keys
    kind: str = "vq"
    levels: list[int] | None = None   # fsq: values per channel, e.g. [8, 8, 6, 5, 5] = 9600 codes
    decorrelation: float = 0.0        # fsq: weight of a loss on the correlation of its channels
    codebook_size: int = 512          # K (fsq: the product of levels, set from them)
    codebook_dim: int | None = None   # low-dim code projection (ViT-VQGAN); None = code_dim
    beta: float = 0.25                # commitment weight (paper)
    ema: bool = True                  # EMA codebook updates (paper appendix)
    decay: float = 0.99               # EMA decay
    eps: float = 1e-5                 # Laplace smoothing of EMA counts
    dead_code_threshold: float = 1.0  # restart codes whose EMA count falls below this (a restarted code counts min(1, 2x this)); 0 = off
    kmeans_init: bool = True          # k-means++ initialisation from the first batch
    kmeans_iters: int = 10            # Lloyd iterations of that initialisation
    l2_normalize: bool = False        # cosine codes (LlamaGen / ViT-VQGAN)
    chunk_size: int = 0               # rows per nearest() chunk; 0 = automatic
    # how the reconstruction gradient passes the quantiser: straight_through (the paper) or
    # rotation (Fifty et al. 2024, the rotation trick: rotate and rescale e onto its code)
    gradient: str = "straight_through"
    # SimVQ (Zhu et al. 2024): codes = a learned linear map of a frozen random codebook; needs
    # ema: false (the map is learned by the codebook loss)
    simvq: bool = False

    def __post_init__(self):
        check_types(self, "model.quantizer")
        check(self.kind in ("vq", "fsq"), "model.quantizer.kind", self.kind, "must be vq or fsq")
        if self.kind == "fsq":
            self._check_levels()
        else:
            check(self.levels is None, "model.quantizer.levels", self.levels,
                  "is for kind: fsq; a vq quantiser takes codebook_size")
            check(self.decorrelation == 0, "model.quantizer.decorrelation", self.decorrelation, "is for kind: fsq")
        check(self.decorrelation >= 0, "model.quantizer.decorrelation", self.decorrelation, "must be >= 0")
        check(not (self.simvq and self.ema), "model.quantizer.simvq", self.simvq,
              "needs ema: false (SimVQ learns its codebook map by gradient, not by EMA)")
        check(self.codebook_size >= 2, "model.quantizer.codebook_size", self.codebook_size, "must be >= 2")
        check(self.codebook_size <= 2**31 - 1, "model.quantizer.codebook_size", self.codebook_size, "is too large")
        check(self.codebook_dim is None or self.codebook_dim >= 1, "model.quantizer.codebook_dim",
               self.codebook_dim, "must be a positive integer or null")
        check(self.beta >= 0, "model.quantizer.beta", self.beta, "must be >= 0")
        check(0.0 < self.decay < 1.0, "model.quantizer.decay", self.decay, "must be in (0, 1)")
        check(self.eps > 0, "model.quantizer.eps", self.eps, "must be > 0")
        check(self.dead_code_threshold >= 0, "model.quantizer.dead_code_threshold",
               self.dead_code_threshold, "must be >= 0 (0 disables restarts)")
        check(self.kmeans_iters >= 1, "model.quantizer.kmeans_iters", self.kmeans_iters, "must be >= 1")
        check(self.gradient in ("straight_through", "rotation"), "model.quantizer.gradient", self.gradient,
              "must be straight_through or rotation")
        check(self.chunk_size >= 0, "model.quantizer.chunk_size", self.chunk_size, "must be >= 0 (0 = automatic)")

    def _check_levels(self) -> None:
        key = "model.quantizer.levels"
        levels = self.levels
        check(isinstance(levels, (list, tuple)) and len(levels) >= 1, key, levels,
              "must be a list of integers >= 2 for kind: fsq, e.g. [8, 8, 6, 5, 5]")
        for level in levels:
            check(isinstance(level, numbers.Integral) and not isinstance(level, bool) and level >= 2,
                  key, levels, "must hold integers >= 2 only")
        self.levels = [int(level) for level in levels]
        size = math.prod(self.levels)
        check(size <= 2**31 - 1, key, self.levels, f"give {size} codes, more than 2**31 - 1")
        # codebook_size follows from levels; a different explicit one is a contradiction (512 is
        # the dataclass default, so only it cannot be told from an unset value)
        check(self.codebook_size in (size, 512), "model.quantizer.codebook_size", self.codebook_size,
              f"contradicts levels {self.levels} (prod = {size}); leave codebook_size out for kind: fsq")
        self.codebook_size = size


@dataclass
class VQVAEConfig:
    in_channels: int = 1              # 1 (grey) or 3 (RGB)
    resolution: int = 28              # input H = W
    hidden: int = 128                 # encoder/decoder width
    res_hidden: int = 64              # width inside residual blocks
    outer_hidden: int | None = None   # width at the finer resolutions; None = hidden // 2 (paper)
    num_res_blocks: int = 2           # residual blocks in the encoder
    decoder_res_blocks: int | None = None   # residual blocks in the decoder; None = num_res_blocks
    num_downsamples: int = 2          # stride-2 4x4 convs: 28->7, 32->8, 128->32
    code_dim: int = 64                # D
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self):
        if isinstance(self.quantizer, dict):
            self.quantizer = from_dict(QuantizerConfig, self.quantizer, prefix="model.quantizer")
        if not isinstance(self.quantizer, QuantizerConfig):
            raise ConfigError(f"model.quantizer must be a mapping, got {type(self.quantizer).__name__}")
        check_types(self, "model")
        check(self.in_channels in (1, 3), "model.in_channels", self.in_channels, "must be 1 (grey) or 3 (RGB)")
        for key in ("resolution", "hidden", "res_hidden", "code_dim", "num_downsamples"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        check(self.outer_hidden is None or self.outer_hidden >= 1, "model.outer_hidden",
              self.outer_hidden, "must be >= 1 or null (hidden // 2)")
        check(self.num_res_blocks >= 0, "model.num_res_blocks", self.num_res_blocks, "must be >= 0")
        check(self.decoder_res_blocks is None or self.decoder_res_blocks >= 0, "model.decoder_res_blocks",
              self.decoder_res_blocks, "must be >= 0 or null (num_res_blocks)")
        factor = 2 ** self.num_downsamples
        check(self.resolution % factor == 0, "model.resolution", self.resolution,
               f"must be divisible by 2**num_downsamples = {factor}")
        check_codebook_fits(self.quantizer, self.code_dim)

    @property
    def outer_width(self) -> int:
        return self.outer_hidden or max(self.hidden // 2, 1)

    @property
    def decoder_blocks(self) -> int:
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // 2 ** self.num_downsamples
        return side, side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "model") -> "VQVAEConfig":
        return from_dict(cls, data, prefix=prefix)


def check(ok: bool, key: str, value, why: str) -> None:
    """Raise ConfigError('<dotted key> = <value> <why>') unless ok; shared by every stage config."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} {why}")


def check_types(config, prefix: str) -> None:
    """Refuse a field whose value is not of its annotated type, by its dotted key: int fields take
    integers only (not 512.0, True or "512"), float fields any real number (stored as float, and
    finite), bool fields true/false, str fields strings. Numpy scalars count as their kind."""
    for name, kind in _field_kinds(type(config)).items():
        value = getattr(config, name)
        key = f"{prefix}.{name}"
        if value is None and kind.optional:
            continue
        if kind.base is int:
            check(isinstance(value, numbers.Integral) and not isinstance(value, bool), key, value,
                  "must be an integer" + (" or null" if kind.optional else ""))
            setattr(config, name, int(value))
        elif kind.base is float:
            check(isinstance(value, numbers.Real) and not isinstance(value, bool), key, value, "must be a number")
            check(math.isfinite(value), key, value, "must be a finite number")
            setattr(config, name, float(value))
        elif kind.base is bool:
            check(isinstance(value, bool), key, value, "must be true or false")
        elif kind.base is str:
            check(isinstance(value, str), key, value, "must be a string")


class _Kind(typing.NamedTuple):
    base: type
    optional: bool


@functools.cache
def _field_kinds(cls) -> dict[str, _Kind]:
    """{field: (int/float/bool/str, may be None)} for the scalar fields of a config dataclass."""
    kinds = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        bases = [a for a in args if a is not type(None)]
        if len(bases) == 1 and bases[0] in (int, float, bool, str):
            kinds[name] = _Kind(bases[0], len(bases) < len(args))
    return kinds


# fp32 tables of K rows that a quantizer holds: the codebook, and with EMA its running sums
# (K x D) and counts (K). Refused when they alone would not fit in this machine's memory.
FP32_BYTES = 4
FALLBACK_MEMORY_LIMIT = 1 << 40    # where the physical memory cannot be read


def codebook_table_bytes(config: QuantizerConfig, code_dim: int) -> int:
    """Bytes of the quantizer's codebook-sized tensors for encoder width code_dim (none for fsq)."""
    if config.kind == "fsq":
        return 0
    d = config.codebook_dim or code_dim
    k = config.codebook_size
    return FP32_BYTES * (k * d * (2 if config.ema else 1) + (k if config.ema else 0))


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_codebook_fits(config: QuantizerConfig, code_dim: int, prefix: str = "model.quantizer") -> None:
    need = codebook_table_bytes(config, code_dim)
    memory = physical_memory_bytes()
    limit = memory or FALLBACK_MEMORY_LIMIT
    if need > limit:
        d = config.codebook_dim or code_dim
        where = f"this machine's {_gib(memory)} of memory" if memory else f"the {_gib(limit)} limit"
        raise ConfigError(f"{prefix}.codebook_size = {config.codebook_size} with dimension {d} needs "
                          f"{_gib(need)} for its codebook tables (K x D fp32"
                          f"{', twice, with the EMA buffers' if config.ema else ''}), more than {where}")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def from_dict(cls, data: dict, prefix: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(known))})")
    return cls(**data)
