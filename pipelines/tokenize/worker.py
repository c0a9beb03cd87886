"""The Ray actor: loads the tokenizer once, then tokenizes one shard per call.

torch is imported in the actor, not here: the driver imports this module to define the actor
class and must not pay torch's import (~1.5 s of a 2-core machine's start-up)."""
from __future__ import annotations

import os

from ..output_format import OutputMetadata


class TokenizeWorker:
    def __init__(self, tokenizer: str, meta_json: str, output: str, keep_fields: list[str],
                 batch_size: int, cpus: float):
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
        # a one-CPU CPU worker decodes inline: a decode thread would only time-share its core
        # with the encoder (measured: 5% slower per shard); GPU workers decode in a pool
        inline = self.encoder.device.type == "cpu" and threads == 1
        self.job = ShardTokenizer(self.encoder, meta, output, keep_fields, batch,
                                  decode_threads=0 if inline else threads)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.encoder.device)}

    def process(self, url: str, shard: str, attempt: int) -> dict:
        return self.job.run(url, shard, attempt)
