"""Training data: an endless, resumable stream of image batches from WebDataset shards.

Split: every epoch the shard list is shuffled with the same seed on every rank and dealt to
(rank, worker) slots; with fewer shards than slots each slot reads every shard and keeps every
slots-th sample. Either way no sample reaches two slots within an epoch. Each slot then shuffles
through a buffer seeded by (seed, epoch, slot), so its stream is a pure function of those and a
position (epoch, samples consumed) is enough to resume it: skipping replays the buffer on raw
bytes without decoding.
"""
from __future__ import annotations

import io
import random
import sys
import tarfile
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import expand_urls, iter_tar_samples, sample_image_bytes
from ..errors import UserError
from .stop import shield_data_worker

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"}


class DataMismatch(UserError):
    """The images do not match the model config (channels or size): stop, do not skip."""


def decode_checked(data: bytes, channels: int, resolution: int, where: str) -> np.ndarray:
    """Image bytes -> (C, H, W) uint8. Raises DataMismatch when the image's own channel count or
    size differs from the config, any other exception when the bytes are not an image."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        native = 1 if img.mode in GREY_MODES else 3
        if native != channels:
            raise DataMismatch(f"{where}: image has {native} channel(s) ({img.mode}) but "
                               f"model.in_channels = {channels}")
        if img.size != (resolution, resolution):
            raise DataMismatch(f"{where}: image is {img.size[0]}x{img.size[1]} but model.resolution "
                               f"= {resolution}; make SxS shards with `vqtok prepare folder --size`")
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def check_first_sample(urls: list[str], channels: int, resolution: int) -> None:
    """Fail fast (before launching ranks) on a channel/size mismatch or unreadable data."""
    try:
        for sample in iter_tar_samples(urls[0]):
            found = sample_image_bytes(sample)
            if found is None:
                continue
            decode_checked(found[1], channels, resolution, f"{urls[0]} sample {sample['__key__']}")
            return
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{urls[0]}: not a readable WebDataset tar ({e})") from None
    raise UserError(f"{urls[0]}: no image sample (.png/.jpg/...) in the first shard")


class ShardStream(IterableDataset):
    """Yields dicts: images (B, C, H, W) uint8, worker, epoch, offset, bad (cumulative count of
    undecodable samples skipped by this worker)."""

    def __init__(self, urls: list[str], *, channels: int, resolution: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 start: dict[int, tuple[int, int]] | None = None, endless: bool = True):
        self.urls = list(urls)
        self.channels, self.resolution = channels, resolution
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.buffer = seed, shuffle_buffer
        self.start = dict(start or {})
        self.endless = endless

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, self.rank * workers + worker, self.world_size * workers

    def raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        shards = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        by_shard = len(shards) >= slots
        mine = shards[slot::slots] if by_shard else shards
        index = 0
        for url in mine:
            try:
                for sample in iter_tar_samples(url):
                    if by_shard or index % slots == slot:
                        yield sample
                    index += 1
            except (tarfile.TarError, OSError) as e:
                # a truncated shard: keep what was read, report, go on with the next shard
                print(f"warning: {url}: unreadable after {index} samples ({e}); skipping the rest",
                      file=sys.stderr)
                yield {"__bad__": True}

    def shuffled(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}-{epoch}-{slot}")
        buf: list[dict] = []
        for sample in self.raw_samples(epoch, slot, slots):
            if len(buf) < self.buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        worker, slot, slots = self._slot()
        epoch, skip = self.start.get(worker, (0, 0))
        bad = 0
        images: list[np.ndarray] = []
        while True:
            offset = 0
            for sample in self.shuffled(epoch, slot, slots):
                offset += 1
                if offset <= skip:
                    continue
                array = self._decode(sample)
                if array is None:
                    bad += 1
                    continue
                images.append(array)
                if len(images) == self.batch_size:
                    yield {"images": torch.from_numpy(np.stack(images)), "worker": worker,
                           "epoch": epoch, "offset": offset, "bad": bad}
                    images = []
            if offset == 0:
                raise UserError(f"data slot {slot} of {slots} got no samples: fewer samples than "
                                "ranks x data.num_workers")
            epoch, skip = epoch + 1, 0
            if not self.endless:
                if images:
                    yield {"images": torch.from_numpy(np.stack(images)), "worker": worker,
                           "epoch": epoch - 1, "offset": offset, "bad": bad}
                return

    def _decode(self, sample: dict) -> np.ndarray | None:
        if sample.get("__bad__"):
            return None
        found = sample_image_bytes(sample)
        if found is None:
            return None
        try:
            return decode_checked(found[1], self.channels, self.resolution,
                                  f"{sample['__url__']} sample {sample['__key__']}")
        except DataMismatch:
            raise
        except Exception:  # undecodable bytes: counted and skipped, never fatal
            return None


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=shield_data_worker if num_workers else None)


def load_images(urls: list[str], channels: int, resolution: int, limit: int) -> torch.Tensor:
    """The first `limit` decodable images of `urls` in order: (N, C, H, W) uint8 (validation)."""
    stream = ShardStream(urls, channels=channels, resolution=resolution, batch_size=limit,
                         seed=0, shuffle_buffer=1, endless=False)
    for batch in stream:
        return batch["images"][:limit]
    raise UserError(f"no decodable image in {urls[0]}")
