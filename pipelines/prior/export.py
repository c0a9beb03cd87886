"""A trained prior as a directory: RUN/final/ = the prior (config.json, model.safetensors; see
tokenizer/prior.py) plus what eval and sample need of the training codes, so that neither has
to read them again:

- config.json's metadata: the codes' identity (tokenizer sha256, K, grid, image size), the label
  field, the training rows' bits per code and the run's config;
- train_stats.safetensors: the training codes' histogram (K,) (eval's unigram baseline) and the
  sorted 64-bit hashes of every training grid (sample's novelty check).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tokenizer import CheckpointError, Prior
from tokenizer.checkpoint import join_url, load_weights, save_weights_bytes
from tokenizer.storage import write_bytes_atomic

from ..errors import UserError
from ..output_format import OutputMetadata
from ..readers import CodesDataset

TRAIN_STATS = "train_stats.safetensors"


@dataclass
class TrainStats:
    code_counts: np.ndarray       # (K,) int64: how often each code occurs in the training rows
    grid_hashes: np.ndarray       # sorted unique int64: grid_hashes() of every training grid
    rows: int


def grid_hashes(codes: np.ndarray) -> np.ndarray:
    """(n, h, w) integer codes -> (n,) int64: the first 8 bytes of each grid's BLAKE2b (codes as
    little-endian int32 in raster order). Equal grids hash equal; distinct ones collide with
    probability about 2^-64 per pair."""
    rows = np.ascontiguousarray(codes.reshape(len(codes), -1).astype("<i4"))
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True)
                     for r in rows], dtype=np.int64)


def train_stats(dataset: CodesDataset) -> TrainStats:
    """One in-order pass over every row of `dataset` (make it with rank=0, world_size=1)."""
    counts = np.zeros(dataset.codebook_size, dtype=np.int64)
    hashes, rows = [], 0
    for block in dataset.blocks():
        counts += np.bincount(block.codes.reshape(-1), minlength=dataset.codebook_size)
        hashes.append(grid_hashes(block.codes))
        rows += len(block.codes)
    unique = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.int64)
    return TrainStats(counts, unique, rows)


def codes_identity(meta: OutputMetadata) -> dict:
    return {"tokenizer_sha256": meta.tokenizer_sha256, "codebook_size": meta.codebook_size,
            "grid": list(meta.grid), "channels": meta.channels, "resolution": meta.resolution}


def export_prior(final: str, model: Prior, stats: TrainStats, meta: OutputMetadata, extra: dict) -> str:
    """Write the statistics, then the prior (its config.json last: present = complete)."""
    tensors = {"code_counts": torch.from_numpy(stats.code_counts),
               "grid_hashes": torch.from_numpy(stats.grid_hashes)}
    write_bytes_atomic(join_url(final, TRAIN_STATS), save_weights_bytes(tensors))
    model.save_pretrained(final, {"codes": codes_identity(meta), "train_rows": stats.rows, **extra})
    return final


@dataclass
class PriorExport:
    path: str
    model: Prior
    metadata: dict
    stats: TrainStats

    @property
    def codes(self) -> dict:
        return self.metadata["codes"]

    @property
    def label(self) -> str | None:
        """The field holding the class ids (None: an unconditional prior)."""
        if not self.model.conditional:
            return None
        return self.metadata.get("label_field") or "cls"

    def check_codes(self, meta: OutputMetadata, where: str) -> None:
        """UserError unless `meta` (codes to evaluate, or the tokenizer to decode samples with)
        is what the prior was trained on: K and grid first (a prior of another K), then the
        tokenizer itself."""
        mine = self.codes
        for name, theirs in (("codebook_size", meta.codebook_size), ("grid", list(meta.grid))):
            if mine[name] != theirs:
                raise UserError(f"{where} has {name} {theirs}, the prior {self.path} was trained on codes "
                                f"with {name} {mine[name]}: use a prior trained on this tokenizer's codes")
        if mine["tokenizer_sha256"] != meta.tokenizer_sha256:
            raise UserError(f"{where} comes from tokenizer {meta.tokenizer_sha256[:12]}..., the prior {self.path} "
                            f"was trained on codes of tokenizer {mine['tokenizer_sha256'][:12]}... (same K, other "
                            "codes): use the tokenizer the training codes were made with")


def load_prior(path: str, device: str | torch.device = "cpu") -> PriorExport:
    model, metadata = Prior.from_pretrained(path, map_location=device)
    codes = metadata.get("codes")
    if not isinstance(codes, dict) or not {"tokenizer_sha256", "codebook_size", "grid"} <= set(codes):
        raise CheckpointError(f"{join_url(path, 'config.json')}: no codes identity in its metadata; "
                              "not exported by `vqtok prior train`")
    url = join_url(path, TRAIN_STATS)
    tensors = load_weights(url)
    counts, hashes = tensors.get("code_counts"), tensors.get("grid_hashes")
    if counts is None or hashes is None or counts.shape != (model.config.codebook_size,):
        raise CheckpointError(f"{url}: expected code_counts ({model.config.codebook_size},) and grid_hashes")
    stats = TrainStats(counts.numpy(), hashes.numpy(), int(metadata.get("train_rows", 0)))
    return PriorExport(path, model, metadata, stats)
