"""The prior's training data: endless, resumable batches of code grids from a CodesDataset.

CodesDataset splits every epoch's rows over (rank, data slot) so that no row reaches two slots
and each slot's order is a pure function of (seed, epoch, rank, slot). Each slot here turns
its rows into batches of whole arrays (no per-row dicts), carrying the rows left over at an
epoch's end into the next epoch's first batch, so every row is used once per epoch. A slot's
position (epoch, rows consumed) is enough to resume it.

DataLoader workers: the loader takes one batch from each worker in turn, so batch n of a run
comes from slot n mod W. A resumed run's loader starts again at worker 0, so worker w plays
slot (w + rotation) mod W with rotation = the step resumed from: the batches after a resume are
the batches the unbroken run would have seen.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from ..readers import CodesDataset


def label_classes(dataset: CodesDataset, field: str) -> int:
    """1 + the largest value of the integer column `field` (only that column is read); UserError
    for a non-integer column, missing or negative labels."""
    top = -1
    for path in sorted({g.path for g in dataset.row_groups}):
        with dataset.fs.open(path, "rb") as f:
            column = pq.read_table(f, columns=[field]).column(field)
        if not pa.types.is_integer(column.type):
            raise UserError(f"{path}: column {field!r} must hold integer class ids, found {column.type}; "
                            "set data.label_field='' for an unconditional prior")
        if column.null_count:
            raise UserError(f"{path}: {column.null_count} rows have no {field!r}")
        if len(column):
            low, high = pc.min_max(column).values()
            if low.as_py() < 0:
                raise UserError(f"{path}: column {field!r} holds a negative class id ({low.as_py()})")
            top = max(top, high.as_py())
    if top < 0:
        raise UserError(f"{dataset.url}: no rows")
    return top + 1


class CodeBatches(IterableDataset):
    """Yields {"codes": LongTensor (B, h, w), "cls": LongTensor (B,) (empty when `label` is
    None), "slot", "epoch", "offset" (rows of that epoch consumed by this slot)} forever.

    dataset: this rank's CodesDataset (shuffled or not; its set_epoch is called here).
    start: {slot: (epoch, offset)} to resume from; rotation: see the module docstring."""

    def __init__(self, dataset: CodesDataset, batch_size: int, label: str | None = None,
                 start: dict[int, tuple[int, int]] | None = None, rotation: int = 0):
        self.dataset, self.batch_size, self.label = dataset, int(batch_size), label
        self.start = dict(start or {})
        self.rotation = int(rotation)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.rotation) % workers, workers

    def __iter__(self):
        return self.stream(*self._slot())

    def stream(self, slot: int, slots: int):
        """The batches of data slot `slot` of `slots` (this rank's DataLoader workers)."""
        epoch, skip = self.start.get(slot, (0, 0))
        codes, labels, held = [], [], 0
        while True:
            self.dataset.set_epoch(epoch)
            offset = 0
            for block in self.dataset.blocks(slot, slots):
                n = len(block.keys)
                first = max(0, skip - offset)       # rows of this block consumed before a resume
                offset += n
                if first >= n:
                    continue
                codes.append(block.codes[first:])
                if self.label:
                    labels.append(np.asarray(block.extra[self.label][first:], dtype=np.int64))
                held += n - first
                while held >= self.batch_size:
                    batch, codes, labels = _take(codes, labels, self.batch_size)
                    held -= self.batch_size
                    # the batch's last row is the (offset - held)-th of this epoch
                    yield {**batch, "slot": slot, "epoch": epoch, "offset": offset - held}
            if offset == 0:
                raise UserError(f"{self.dataset.url}: data slot {slot} of rank {self.dataset.rank} got no rows: "
                                "fewer rows than ranks x data.num_workers")
            epoch, skip = epoch + 1, 0


def _take(codes: list[np.ndarray], labels: list[np.ndarray], n: int):
    """The first n rows of the held arrays as a batch, and the arrays left."""
    all_codes = codes[0] if len(codes) == 1 else np.concatenate(codes)
    batch = {"codes": torch.from_numpy(np.ascontiguousarray(all_codes[:n]))}
    rest_codes = [all_codes[n:]] if len(all_codes) > n else []
    if labels:
        all_labels = labels[0] if len(labels) == 1 else np.concatenate(labels)
        batch["cls"] = torch.from_numpy(np.ascontiguousarray(all_labels[:n]))
        rest_labels = [all_labels[n:]] if len(all_labels) > n else []
    else:
        batch["cls"] = torch.zeros(0, dtype=torch.int64)
        rest_labels = []
    return batch, rest_codes, rest_labels
