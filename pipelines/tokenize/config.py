"""TokenizeConfig: every knob of `vqtok tokenize`, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenizer.config import check


@dataclass
class TokenizeConfig:
    tokenizer: str = ""                  # tokenizer directory or URL (config.json + model.safetensors)
    inputs: list[str] = field(default_factory=list)   # shard URLs / brace ranges / globs
    output: str = ""                     # output directory URL
    address: str | None = None           # Ray cluster to join; None = RAY_ADDRESS or a local Ray
    workers: int = 0                     # 0 = as many as the cluster's GPUs (or CPUs) allow
    gpus_per_worker: float | None = None  # None = 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # None = 1 on CPU-only clusters, else the GPU node's CPU share
    batch_size: int = 256                # images per encode call (rounded up to the micro-batch)
    max_error_rate: float = 0.01         # exit non-zero above this (failed / read)
    keep_fields: list[str] = field(default_factory=list)  # e.g. ["cls"]; passed through
    overwrite: bool = False              # replace an output made by another tokenizer/settings
    max_attempts: int = 3                # per shard, counting worker deaths and storage errors
    placement_timeout: float = 300.0     # seconds with no worker placed/alive before the job stops
    shard_timeout: float = 1800.0        # seconds one attempt may take to read and decode a shard
    max_member_bytes: int = 256 << 20    # a larger tar member is an error row, never read into memory
    lease_heartbeat: float = 10.0        # seconds between rewrites of OUTPUT/_lease.json's heartbeat
    lease_stale: float = 60.0            # a lease with no heartbeat for this long is taken over
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if isinstance(self.keep_fields, str):
            self.keep_fields = [f.strip() for f in self.keep_fields.split(",") if f.strip()]
        check(bool(self.tokenizer), "tokenize.tokenizer", self.tokenizer, "is required (a tokenizer directory or URL)")
        check(bool(self.inputs), "tokenize.inputs", self.inputs, "needs at least one shard URL")
        check(bool(self.output), "tokenize.output", self.output, "is required (an output directory URL)")
        check(self.workers >= 0, "tokenize.workers", self.workers, "must be >= 0 (0 = automatic)")
        check(self.gpus_per_worker is None or self.gpus_per_worker >= 0, "tokenize.gpus_per_worker",
               self.gpus_per_worker, "must be >= 0")
        check(self.cpus_per_worker is None or self.cpus_per_worker > 0, "tokenize.cpus_per_worker",
               self.cpus_per_worker, "must be > 0")
        check(self.batch_size >= 1, "tokenize.batch_size", self.batch_size, "must be >= 1")
        check(0.0 <= self.max_error_rate <= 1.0, "tokenize.max_error_rate", self.max_error_rate,
               "must be in [0, 1]")
        check(self.max_attempts >= 1, "tokenize.max_attempts", self.max_attempts, "must be >= 1")
        check(self.max_member_bytes >= 1, "tokenize.max_member_bytes", self.max_member_bytes, "must be >= 1")
        check(self.placement_timeout > 0, "tokenize.placement_timeout", self.placement_timeout,
               "must be > 0 seconds")
        check(self.shard_timeout > 0, "tokenize.shard_timeout", self.shard_timeout, "must be > 0 seconds")
        check(self.lease_heartbeat > 0, "tokenize.lease_heartbeat", self.lease_heartbeat, "must be > 0 seconds")
        # a live job's lease must not look stale after one late heartbeat
        check(self.lease_stale >= 3 * self.lease_heartbeat, "tokenize.lease_stale", self.lease_stale,
               f"must be at least 3 x tokenize.lease_heartbeat ({self.lease_heartbeat:g} s)")
        reserved = {"key", "shard", "codes"} & set(self.keep_fields)
        check(not reserved, "tokenize.keep_fields", self.keep_fields,
               f"must not name an output column ({', '.join(sorted(reserved))})")
        for name in self.keep_fields:
            check(name.replace(".", "").replace("_", "").replace("-", "").isalnum(),
                   "tokenize.keep_fields", name, "must be a WebDataset field name such as cls or json")

