"""Training data: an endless, resumable stream of image batches from WebDataset shards.

Split: every epoch the shard list is shuffled with the same seed on every rank and dealt to
(rank, worker) slots; with fewer shards than slots each slot reads every shard and keeps every
slots-th sample. Either way no sample reaches two slots within an epoch. Each slot then shuffles
through a buffer seeded by (seed, epoch, slot), so its stream is a pure function of those and a
position (epoch, samples consumed) is enough to resume it: skipping replays the buffer on raw
bytes without decoding.

Shards are read by the one damage-aware reader (TarShardReader) and samples judged by the one
sample policy (SamplePolicy), as `vqtok tokenize` and `vqtok eval` do, so the three see the
same pixels, and refuse the same samples, for the same bytes. A damaged shard keeps its readable head; stderr says which shard
ended how, and the batches count damaged shards (`damaged`) for the metrics.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from ..samples import Rejection, SamplePolicy, printable, reads_field
from ..shards.reader import Sample, TarShardReader
from .stop import shield_data_worker


class DataMismatch(UserError):
    """The images do not match the model config (channels or size): stop, do not skip."""


def decode_checked(sample: Sample, policy: SamplePolicy, where: str) -> np.ndarray | None:
    """A sample's image -> (C, H, W) uint8, or None when the policy rejects it (counted and
    skipped). Raises DataMismatch when a strict policy finds another channel count or size."""
    judged = policy(sample)
    if not isinstance(judged, Rejection):
        return judged[0]
    if judged.reason == "channel_mismatch":
        native, mode = judged.found
        raise DataMismatch(f"{where}: image has {native} channel(s) ({mode}) but "
                           f"model.in_channels = {policy.preprocess.channels}")
    if judged.reason == "size_mismatch":
        w, h = judged.found
        res = policy.preprocess.resolution
        raise DataMismatch(f"{where}: image is {w}x{h} but model.resolution = {res}; "
                           "make SxS shards with `vqtok prepare folder --size`, or set "
                           "data.strict_size=false to resize and centre-crop as tokenize does")
    return None


def check_first_sample(urls: list[str], channels: int, resolution: int, strict: bool = True) -> None:
    """Fail fast (before launching ranks) on a channel/size mismatch or unreadable data."""
    policy = SamplePolicy(channels, resolution, strict=strict)
    reader = TarShardReader(urls[0], policy.wants)
    for sample in reader:
        if decode_checked(sample, policy, f"{urls[0]} sample {printable(sample.key)}") is not None:
            return
    if reader.error:
        raise UserError(f"{urls[0]}: no readable image before the shard ends: {reader.error}")
    raise UserError(f"{urls[0]}: no image sample (.png/.jpg/...) in the first shard")


class ShardStream(IterableDataset):
    """Yields dicts: images (B, C, H, W) uint8, worker, epoch, offset, bad (cumulative count of
    undecodable samples skipped by this worker), damaged (cumulative count of damaged shards
    this worker read)."""

    def __init__(self, urls: list[str], *, channels: int, resolution: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 start: dict[int, tuple[int, int]] | None = None, endless: bool = True,
                 strict_size: bool = True):
        self.urls = list(urls)
        self.channels, self.resolution = channels, resolution
        self.strict_size = strict_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.buffer = seed, shuffle_buffer
        self.start = dict(start or {})
        self.endless = endless

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, self.rank * workers + worker, self.world_size * workers

    def raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[str, Sample | None]]:
        """(url, sample) in this slot's order; (url, None) after a damaged shard's head."""
        shards = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        by_shard = len(shards) >= slots
        mine = shards[slot::slots] if by_shard else shards
        index = 0
        for url in mine:
            reader = TarShardReader(url, reads_field)
            for sample in reader:
                if by_shard or index % slots == slot:
                    yield url, sample
                index += 1
            if reader.error:
                # a damaged shard: its readable head was used; say so, count it, go on
                if by_shard or slot == 0:
                    print(f"warning: {url}: {reader.error}; used the samples before the damage",
                          file=sys.stderr, flush=True)
                yield url, None

    def shuffled(self, epoch: int, slot: int, slots: int) -> Iterator[tuple]:
        rng = random.Random(f"{self.seed}-{epoch}-{slot}")
        buf: list = []
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
        bad = damaged = 0
        policy = SamplePolicy(self.channels, self.resolution, strict=self.strict_size)
        images: list[np.ndarray] = []
        while True:
            offset = 0
            for sample in self.shuffled(epoch, slot, slots):
                offset += 1
                if offset <= skip:
                    continue
                url, item = sample
                if item is None:
                    damaged += 1
                    continue
                array = decode_checked(item, policy, f"{url} sample {printable(item.key)}")
                if array is None:
                    bad += 1
                    continue
                images.append(array)
                if len(images) == self.batch_size:
                    yield {"images": torch.from_numpy(np.stack(images)), "worker": worker,
                           "epoch": epoch, "offset": offset, "bad": bad, "damaged": damaged}
                    images = []
            if offset == 0:
                raise UserError(f"data slot {slot} of {slots} got no samples: fewer samples than "
                                "ranks x data.num_workers")
            epoch, skip = epoch + 1, 0
            if not self.endless:
                if images:
                    yield {"images": torch.from_numpy(np.stack(images)), "worker": worker,
                           "epoch": epoch - 1, "offset": offset, "bad": bad, "damaged": damaged}
                return


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                     # not on Linux
        return os.cpu_count() or 1


def data_workers(setting: int | str, device_type: str, local_ranks: int, cores: int) -> int:
    """data.num_workers as a number: a number stays; "auto" is 0 on a CPU run whose ranks have
    at most one core each, else 2. There a worker adds no parallelism, only a fourth process
    taking turns with two busy ranks: the rank it preempts holds up the other at the next
    all-reduce. 0 and 1 worker read the same data slot, so the choice changes speed only, not
    the samples or their order (see same_data_layout)."""
    if setting != "auto":
        return int(setting)
    return 0 if device_type == "cpu" and cores < 2 * local_ranks else 2


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=shield_data_worker if num_workers else None)


def load_images(urls: list[str], channels: int, resolution: int, limit: int,
                strict_size: bool = True) -> torch.Tensor:
    """The first `limit` decodable images of `urls` in order: (N, C, H, W) uint8 (validation)."""
    stream = ShardStream(urls, channels=channels, resolution=resolution, batch_size=limit,
                         seed=0, shuffle_buffer=1, endless=False, strict_size=strict_size)
    for batch in stream:
        return batch["images"][:limit]
    raise UserError(f"no decodable image in {urls[0]}")
