"""Training configuration: YAML sections model / data / optim / train, each a typed dataclass.

A run's config is resolved once (YAML, then --set overrides, then the dedicated flags) by the
launcher, or by rank 0 under a user's own torchrun, and recorded as RUN_DIR/config.yaml; the
ranks build their TrainConfig from that text, never from argv.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import yaml

from tokenizer import VQVAEConfig
from tokenizer.config import check
from tokenizer.storage import write_bytes_atomic

from ..config import build, load_yaml, merge, parse_overrides, to_dict
from ..errors import ConfigError, UserError
from .augment import AugmentConfig
from .checkpoint import list_checkpoints

RUN_CONFIG = "config.yaml"
# keys a --resume may change: they steer how the run goes on, not what it trains (the data
# stream copes with another worker count; validation runs on rank 0 only)
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.log_every", "train.val_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.progress", "train.timeout_s", "train.device", "train.bf16",
    "data.num_workers", "data.val", "data.val_samples"})


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)   # shard URL patterns (braces, globs, dirs)
    val: list[str] = field(default_factory=list)     # validation shards (rank 0); none = no validation
    batch_size: int = 128          # global: split evenly over ranks
    # DataLoader workers per rank, or "auto": 0 on a CPU run whose ranks have at most one core
    # each (a worker would only take turns with its rank), else 2; 0 and 1 read the same samples
    num_workers: int | str = 2
    shuffle_buffer: int = 2000     # samples per worker
    val_samples: int = 1024        # validation images (rank 0)
    # true: images must already have model.in_channels and model.resolution (a mismatch stops
    # the run); false: convert and resize/centre-crop them by the tokenize image policy
    strict_size: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)   # off unless asked for

    def __post_init__(self):
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        check(self.num_workers == "auto" or (type(self.num_workers) is int and self.num_workers >= 0),
              "data.num_workers", self.num_workers, "must be an integer >= 0 or 'auto'")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        check(self.val_samples >= 1, "data.val_samples", self.val_samples, "must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-3               # AdamW peak learning rate
    beta1: float = 0.9             # AdamW betas
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0          # linear warmup from 0
    schedule: str = "cosine"       # cosine | constant (after warmup)
    min_lr_ratio: float = 0.1      # cosine floor as a fraction of lr
    grad_clip: float = 0.0         # max global grad norm; 0 = off

    def __post_init__(self):
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.schedule in ("cosine", "constant"), "optim.schedule", self.schedule,
               "must be 'cosine' or 'constant'")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")


@dataclass
class LoopConfig:
    max_steps: int = 3000          # optimizer steps of the whole run
    log_every: int = 50            # steps per metrics.jsonl training line
    val_every: int = 500           # steps per validation (also after the last step)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3      # newest checkpoints kept
    seed: int = 0                  # model init, data order, augmentation
    bf16: bool = True              # autocast where bf16 is native: CUDA, CPUs with AVX512-BF16 or AMX (the quantiser stays fp32)
    device: str = "auto"           # auto | cpu | cuda
    timeout_s: float = 600.0       # collective timeout: a rank whose peer died fails, not hangs
    progress: bool = True          # progress bar on rank 0

    def __post_init__(self):
        for key in ("max_steps", "log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device,
               "must be auto, cpu or cuda")
        check(self.timeout_s > 0, "train.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class TrainConfig:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


def resolve_config(config_url: str | None, overrides=(), *, train_data=None, val_data=None,
                   max_steps: int | None = None, batch_size: int | None = None) -> TrainConfig:
    """YAML, then --set overrides, then the dedicated CLI flags (which win)."""
    data = load_yaml(config_url) if config_url else {}
    data = merge(data, parse_overrides(overrides))
    flags: dict = {}
    if train_data:
        flags.setdefault("data", {})["train"] = list(train_data)
    if val_data:
        flags.setdefault("data", {})["val"] = list(val_data)
    if batch_size is not None:
        flags.setdefault("data", {})["batch_size"] = batch_size
    if max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = max_steps
    cfg = build(TrainConfig, merge(data, flags))
    if not cfg.data.train:
        raise ConfigError("data.train is empty: pass --train-data URL (shard pattern)")
    return cfg


# ---- the run's record: RUN_DIR/config.yaml --------------------------------------------------------
def run_config_url(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{RUN_CONFIG}"


def dump_config(cfg) -> str:
    """The YAML text of a resolved config; `vqtok train --config` reads it back unchanged."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_config(text: str, where: str, cls: type = TrainConfig):
    """Config text (as dump_config writes it) -> a `cls` (TrainConfig, or another trainer's
    config dataclass), validated like any config."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    return build(cls, data)


def read_config_text(url: str) -> str | None:
    """The text of a recorded run config; None when there is none."""
    try:
        with fsspec.open(url, "r") as f:
            return f.read()
    except FileNotFoundError:
        return None


def flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def changed_keys(old, new) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every value that differs."""
    a, b = flat(to_dict(old)), flat(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def record_run_config(cfg, run_dir: str, resume: bool, resumable: frozenset[str] = RESUMABLE_KEYS) -> str:
    """Write `cfg` (a TrainConfig, or another trainer's config dataclass) to RUN_DIR/config.yaml
    (atomically) once it fits the run there; -> its text.

    A run directory with checkpoints is continued only with --resume, and then only with the
    recorded config, except the `resumable` keys (max_steps to extend a run, workers, logging...).
    Without checkpoints nothing was trained yet, so a new config simply replaces the old."""
    url = run_config_url(run_dir)
    found = list_checkpoints(run_dir)
    if found and not resume:
        raise UserError(f"{run_dir} already has checkpoints (newest step {found[-1][0]}); pass "
                        "--resume to continue or choose another --out")
    if found:
        text = read_config_text(url)       # None: a run from before configs were recorded
        if text is not None:
            recorded = parse_config(text, url, type(cfg))
            refused = {k: v for k, v in changed_keys(recorded, cfg).items() if k not in resumable}
            if refused:
                what = ", ".join(f"{k} ({old!r} recorded, {new!r} now)" for k, (old, new) in refused.items())
                raise UserError(f"{url}: --resume cannot change {what}; only "
                                f"{', '.join(sorted(resumable))} may change on resume: drop the "
                                "change or choose another --out")
    text = dump_config(cfg)
    write_bytes_atomic(url, text.encode())
    return text
