"""Fashion-MNIST IDX files -> WebDataset shards train-%06d.tar / test-%06d.tar (.png + .cls)."""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..pictures import png_bytes
from .idx import read_idx
from ..output_dir import make_output_dir
from ..shards.writer import ShardWriter

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}


def find_idx(source: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(source, name)
        if os.path.exists(path):
            return path
    raise UserError(f"{source}: no {stem}[.gz]; point --source at the Fashion-MNIST IDX files "
                    "(Debian: apt install dataset-fashion-mnist)")


def load_split(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = SPLITS[split]
    images_url = find_idx(source, f"{prefix}-images-idx3-ubyte")
    labels_url = find_idx(source, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_url), read_idx(labels_url)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_url}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{labels_url}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


def prepare_fashion_mnist(out: str, source: str = DEFAULT_SOURCE, shard_size: int = 5000,
                          splits: tuple[str, ...] = ("train", "test"), limit: int = 0,
                          progress: bool = True) -> dict[str, list[str]]:
    """Write each split to `out/{split}-%06d.tar`; returns the shard paths per split.
    `limit` > 0 keeps only the first `limit` samples of each split (tests, smoke runs)."""
    make_output_dir(out, "--out")
    written = {}
    for split in splits:
        images, labels = load_split(source, split)
        n = min(limit, len(images)) if limit > 0 else len(images)
        with ShardWriter(out, f"{split}-%06d.tar", shard_size) as writer:
            for i in tqdm(range(n), desc=f"fashion-mnist {split}", unit="img", disable=not progress):
                writer.write({"__key__": f"{split}{i:06d}", "png": png_bytes(images[i]),
                              "cls": str(int(labels[i])).encode()})
        written[split] = writer.written
    return written
