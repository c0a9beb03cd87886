"""`vqtok prior train` configuration: YAML sections model / data / optim / train, like `vqtok
train`'s (the optim and train sections are the same dataclasses, with the prior's defaults).

The defaults are the CPU-sized prior of configs/prior_cpu.yaml; configs/prior_gpu.yaml is the
accelerator-sized one. The codebook size and grid are not settings: they come from the codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenizer.config import check

from ..config import build, load_yaml, merge, parse_overrides
from ..errors import ConfigError
from ..train.config import LoopConfig, OptimConfig

# keys a --resume may change: how the run goes on, not what it trains
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.log_every", "train.val_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.progress", "train.timeout_s", "train.device", "train.bf16",
    "data.num_workers", "data.val", "data.val_rows", "data.eval_rows"})


@dataclass
class PriorModelConfig:
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0           # dropout's random masks cost a quarter of a CPU step
    # None: from the codes (1 + the largest label of data.label_field; 0 when the codes have no
    # such field); the recorded config holds the resolved number. 0 = unconditional.
    num_classes: int | None = None

    def __post_init__(self):
        for key in ("d_model", "layers", "heads", "mlp_ratio"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "must be >= 1")
        check(self.d_model % self.heads == 0, "model.d_model", self.d_model,
              f"must be divisible by model.heads = {self.heads}")
        check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")
        check(self.num_classes is None or self.num_classes >= 0, "model.num_classes", self.num_classes,
              "must be >= 0 (0 = unconditional) or null (from the codes)")


@dataclass
class PriorDataConfig:
    codes: str = ""                # the `vqtok tokenize` output to train on
    val: str = ""                  # a held-out output of the same tokenizer: `val` records
    label_field: str = "cls"       # condition on this kept integer field if the codes have it; "" = never
    batch_size: int = 64           # global (rows of h x w codes), split evenly over ranks
    num_workers: int = 1           # DataLoader workers per rank
    shuffle_buffer: int = 8192     # rows per shuffle pool (CodesDataset)
    val_rows: int = 2000           # rows of data.val per validation
    eval_rows: int = 5000          # training rows evaluated at export (train bits/code: the gap)

    def __post_init__(self):
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(self.val_rows >= 1, "data.val_rows", self.val_rows, "must be >= 1")
        check(self.eval_rows >= 1, "data.eval_rows", self.eval_rows, "must be >= 1")


@dataclass
class PriorOptimConfig(OptimConfig):
    lr: float = 6e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0


@dataclass
class PriorLoopConfig(LoopConfig):
    max_steps: int = 1500
    log_every: int = 50
    val_every: int = 500
    checkpoint_every: int = 500


@dataclass
class PriorTrainConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    optim: PriorOptimConfig = field(default_factory=PriorOptimConfig)
    train: PriorLoopConfig = field(default_factory=PriorLoopConfig)


def resolve_prior_config(config_url: str | None, overrides=(), *, codes: str | None = None,
                         max_steps: int | None = None, batch_size: int | None = None) -> PriorTrainConfig:
    """YAML, then --set overrides, then the dedicated CLI flags (which win)."""
    data = load_yaml(config_url) if config_url else {}
    data = merge(data, parse_overrides(overrides))
    flags: dict = {}
    if codes:
        flags.setdefault("data", {})["codes"] = codes
    if batch_size is not None:
        flags.setdefault("data", {})["batch_size"] = batch_size
    if max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = max_steps
    cfg = build(PriorTrainConfig, merge(data, flags))
    if not cfg.data.codes:
        raise ConfigError("data.codes is empty: pass --codes OUTPUT (a `vqtok tokenize` output)")
    return cfg
