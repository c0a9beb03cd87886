"""What the driver needs to know about the tokenizer without loading it onto an accelerator."""
from __future__ import annotations

import json

from tokenizer import CheckpointError, VQVAEConfig
from tokenizer.storage import CONFIG_NAME, join_url, read_bytes

from ..output_format import OutputMetadata
from ..images import PREPROCESSING


def tokenizer_metadata(url: str) -> OutputMetadata:
    """OutputMetadata of the tokenizer at `url` (config.json; the weights only if it lacks a sha)."""
    config_url = join_url(url, CONFIG_NAME)
    try:
        raw = json.loads(read_bytes(config_url))
        config = VQVAEConfig.from_dict(raw["model"])
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_url}: not a vqtok tokenizer config ({e})") from None
    sha = raw.get("weights_sha256")
    if not sha:
        from tokenizer import VQVAE
        sha = VQVAE.from_pretrained(url).weights_sha256()
    return OutputMetadata(tokenizer_sha256=sha, codebook_size=config.quantizer.codebook_size,
                          grid=tuple(config.grid), channels=config.in_channels,
                          resolution=config.resolution, preprocessing=PREPROCESSING)
