"""The Ray actor: loads the tokenizer once, then tokenizes shards, several at once.

It is a threaded actor: each `process` call runs in its own thread and takes one of the worker's
decode processes for its shard (calls beyond `slots` wait for one), and all of them share the one
encoder. torch is imported in the actor, not here: the driver imports this module to define the
actor class and must not pay torch's import (a large part of start-up; docs/design.md)."""
from __future__ import annotations

import os

from ..output_format import OutputMetadata


def decode_processes(cpus: float, accelerator: bool) -> int:
    """Decode processes for a worker with `cpus` CPUs: one per CPU. A one-CPU CPU worker decodes
    inline (0): a second process could only time-share its core with the encoder."""
    n = max(1, int(cpus))
    return n if (n > 1 or accelerator) else 0


class TokenizeWorker:
    def __init__(self, tokenizer: str, meta_json: str, output: str, keep_fields: list[str],
                 batch_size: int, cpus: float, max_member_bytes: int | None = None,
                 lease_id: str | None = None, shard_timeout: float | None = None):
        from .encoder import CodeEncoder
        from .shard_job import ShardTokenizer

        threads = max(1, int(cpus))
        self.encoder = CodeEncoder(tokenizer, threads=threads)
        meta = OutputMetadata.from_json(meta_json, where=tokenizer)
        if self.encoder.sha256 != meta.tokenizer_sha256:
            raise RuntimeError(f"{tokenizer}: the weights changed while the job started "
                               f"(sha256 {self.encoder.sha256[:12]}... != {meta.tokenizer_sha256[:12]}...)")
        # round the batch up to whole micro-batches so no encode call pads in the middle
        micro = self.encoder.micro_batch
        batch = -(-batch_size // micro) * micro
        accelerator = self.encoder.device.type != "cpu"
        self.job = ShardTokenizer(self.encoder, meta, output, keep_fields, batch,
                                  decode_processes=decode_processes(cpus, accelerator),
                                  max_member_bytes=max_member_bytes, lease_id=lease_id,
                                  shard_timeout=shard_timeout)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.encoder.device), "slots": self.job.slots}

    def process(self, url: str, shard: str, attempt: int) -> dict:
        return self.job.run(url, shard, attempt)

    def __del__(self):
        job = getattr(self, "job", None)
        if job is not None:
            job.close()
