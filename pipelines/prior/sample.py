"""`vqtok prior sample`: code grids drawn from a prior, written as a vqtok output, decoded.

OUT is a tokenize output in every respect (output_format.py: OUT/samples.parquet with key,
shard, codes and the label column, its manifest, _vqtok.json, _SUCCESS), written by the tokenize
writer's own functions, so `vqtok verify`, `vqtok decode`, `vqtok inspect` and CodesDataset read
it like any other. Its run record's `preprocessing` says how the codes were made (prior, sha256,
temperature, seed) instead of how images were preprocessed. Beside the data, OUT/_samples.png
holds the decoded samples, a row per class (a `_` name: not data to any reader).

Novelty: each sampled grid is compared with every training grid (the hashes exported with the
prior); `copied_share` is the share of samples equal to some training grid, novelty = 1 - that.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from tokenizer import VQVAE
from tokenizer.storage import join_url, write_bytes_atomic

from ..errors import UserError
from ..output_format import FORMAT_VERSION, OutputMetadata, data_path
from ..pictures import image_grid, png_bytes
from ..tokenize.outputs import OutputDir
from ..tokenize.commit import ShardCommitter, codes_table, parquet_bytes
from ..tokenize.tokenizer_info import tokenizer_metadata
from .export import grid_hashes, load_prior

SHARD = "samples"
GRID_NAME = "_samples.png"


def sample_classes(export, n: int, cls: int | None) -> list[int | None]:
    """The class of every sample: n per class (or n of class `cls`); None each when the prior
    is unconditional."""
    classes = export.model.config.num_classes
    if n < 1:
        raise UserError(f"--n {n}: must be >= 1")
    if not export.model.conditional:
        if cls is not None:
            raise UserError(f"--class {cls}: the prior {export.path} is unconditional (its codes had no labels)")
        return [None] * n
    if cls is not None and not 0 <= cls < classes:
        raise UserError(f"--class {cls}: the prior {export.path} knows classes 0..{classes - 1}")
    return [c for c in ([cls] if cls is not None else range(classes)) for _ in range(n)]


@torch.no_grad()
def draw(model, labels: list[int | None], temperature: float, seed: int, batch_size: int,
         device) -> np.ndarray:
    """(N, h, w) int64 codes, batch by batch from one seeded generator."""
    if temperature <= 0:
        raise UserError(f"--temperature {temperature}: must be > 0")
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        part = labels[start:start + batch_size]
        cls = None if part[0] is None else torch.tensor(part, device=device)
        out.append(model.sample(len(part), cls, temperature, generator).cpu().numpy())
    return np.concatenate(out)


def write_samples(out: str, meta: OutputMetadata, codes: np.ndarray, labels: list[int | None],
                  label: str | None, overwrite: bool, summary: dict) -> None:
    """OUT as a one-shard tokenize output, committed as tokenize commits a shard: data, then
    manifest, then the manifest index and _SUCCESS."""
    directory = OutputDir(out)
    directory.prepare(meta, [label] if label else [], overwrite)
    directory.clear_success()
    keys = [f"{SHARD}-{i:06d}" if c is None else f"c{c}-{i:06d}" for i, c in enumerate(labels)]
    kept = {label: list(labels)} if label else {}
    table = codes_table(meta, SHARD, keys, codes.reshape(len(codes), -1), kept)
    t0 = time.perf_counter()
    n = len(keys)
    manifest = {"version": FORMAT_VERSION, "shard": SHARD, "input": summary["prior"],
                "tokenizer_sha256": meta.tokenizer_sha256,
                "counts": {"read": n, "ok": n, "failed": 0, "failed_by_reason": {}, "shard_errors": 0},
                "shard_error": None, "durations_s": {"sample": round(summary["sample_s"], 4)}, "attempt": 1}
    committer = ShardCommitter(out)
    manifest["files"] = committer.commit_data(SHARD, parquet_bytes(table), data_path(out, SHARD), [])
    manifest["durations_s"]["write"] = round(time.perf_counter() - t0, 4)
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    committer.commit_manifest(SHARD, manifest)
    directory.record_finished({SHARD: manifest}, meta.tokenizer_sha256, changed=True)
    directory.mark_success({"shards": 1, "done": 1, "failed_shards": {},
                            "samples": {"read": n, "ok": n, "failed": 0, "failed_by_reason": {}},
                            "shard_errors": 0, "error_rate": 0.0, **summary})


@torch.no_grad()
def decoded_grid(tokenizer: VQVAE, codes: np.ndarray, labels: list, columns: int, device) -> bytes:
    """PNG of the first `columns` samples of each class, a row per class (rows of `columns`
    samples when unconditional)."""
    groups: dict = {}
    for i, c in enumerate(labels):
        groups.setdefault(c, []).append(i)
    rows = []
    for members in groups.values():
        for start in range(0, len(members), columns):
            rows.append(members[start:start + columns])
            if labels[0] is not None:
                break                   # one row per class
    images = tokenizer.decode(torch.from_numpy(codes[[i for r in rows for i in r]]).to(device)).cpu()
    it = iter(images)
    return png_bytes(image_grid([[next(it) for _ in r] for r in rows]))


def sample_prior(prior: str, tokenizer: str, out: str, n: int, cls: int | None = None,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 256, overwrite: bool = False,
                 columns: int = 10, device: str | None = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    export = load_prior(prior, device)
    labels = sample_classes(export, n, cls)
    tok = VQVAE.from_pretrained(tokenizer, map_location=device)
    sha = export.model.weights_sha256()
    meta = dataclasses.replace(tokenizer_metadata(tokenizer), preprocessing={
        "sampled_by": "vqtok prior sample", "prior": prior, "prior_sha256": sha,
        "temperature": temperature, "seed": seed})
    export.check_codes(meta, tokenizer)
    t0 = time.perf_counter()
    codes = draw(export.model, labels, temperature, seed, batch_size, device)
    hashes = grid_hashes(codes)
    copied = np.isin(hashes, export.stats.grid_hashes)
    summary = {"prior": prior, "prior_sha256": sha, "temperature": temperature, "seed": seed,
               "samples_drawn": len(codes), "classes": sorted({c for c in labels if c is not None}),
               "copied_share": float(copied.mean()), "novelty": float(1 - copied.mean()),
               "unique_share": len(np.unique(hashes)) / len(hashes), "train_grids": len(export.stats.grid_hashes),
               "sample_s": time.perf_counter() - t0}
    write_samples(out, meta, codes, labels, export.label, overwrite, summary)
    grid = join_url(out, GRID_NAME)
    write_bytes_atomic(grid, decoded_grid(tok, codes, labels, columns, device))
    return {"out": out, "grid": grid, **{k: v for k, v in summary.items() if k != "sample_s"},
            "sample_s": round(summary["sample_s"], 2)}
