"""CodesDataset: a tokenize output as a torch IterableDataset for training priors.

The rows of all data files, in (file, row group) order, form one global sequence of N rows. Rank
r of R takes the contiguous slice [r*N//R, (r+1)*N//R) of it (ranks differ by at most one row;
steps_per_epoch() gives a step count every rank can run) and DataLoader worker w of W takes the
same kind of slice of its rank's slice. Every row is therefore read by exactly one (rank, worker). Reading is by row
group: a worker opens only the row groups its slice touches. With shuffle=True the row-group
order is permuted (seeded by seed + epoch, identical on all ranks) before slicing, and rows are
shuffled inside each worker in pools of >= shuffle_buffer rows (whole row-group slices,
permuted together).
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .code_rows import codes_array
from .errors import UserError
from .output_format import (CODES, KEY, SHARD, OutputMetadata, list_data_files,
                            metadata_from_schema, require_same_tokenizer, success_path)


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int        # row group index inside the file
    num_rows: int


@dataclass
class Block:
    """Rows read together: keys, codes (n, h, w) int64, passed-through fields."""
    keys: list
    codes: np.ndarray
    extra: dict

    @staticmethod
    def permuted(blocks: list["Block"], rng: np.random.Generator) -> "Block":
        keys = [k for b in blocks for k in b.keys]
        order = rng.permutation(len(keys))
        codes = np.concatenate([b.codes for b in blocks])[order]
        extra = {name: [v for b in blocks for v in b.extra[name]] for name in blocks[0].extra}
        return Block([keys[i] for i in order], codes,
                     {name: [values[i] for i in order] for name, values in extra.items()})


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group."""
    group: RowGroup
    start: int
    stop: int


class CodesDataset(IterableDataset):
    """Yields {"key": str, "codes": LongTensor (h, w), <field>: value for each of `fields`}.

    url: a `vqtok tokenize` output directory (local path or fsspec URL).
    rank / world_size: this process's data-parallel rank; default from RANK / WORLD_SIZE.
    shuffle / seed: deterministic shuffling; call set_epoch(e) before each epoch for a new order.
    fields: extra columns to pass through (the tokenize --keep-fields), e.g. ("cls",); None (the
        default) passes every kept field the output has, () none; naming a missing one is an error.
    shuffle_buffer: when shuffling, each worker permutes pools of at least this many rows
        (whole row-group slices, so a pool also spans row groups).
    """

    def __init__(self, url: str, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, seed: int = 0, fields: tuple[str, ...] | list[str] | None = None,
                 shuffle_buffer: int = 8192):
        super().__init__()
        self.url = url
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.fs, paths = list_data_files(url)
        self._fs_pid = os.getpid()
        if not self.fs.exists(self.fs._strip_protocol(success_path(url))):
            warnings.warn(f"{url}: no _SUCCESS, the tokenize run is unfinished: rows of unfinished "
                          "shards are missing, and ranks that list the directory at different times "
                          "could disagree on the files", UserWarning, stacklevel=2)
        self.metadata, self.row_groups, self.fields = _scan(
            self.fs, paths, None if fields is None else tuple(fields))
        self.num_rows = sum(g.num_rows for g in self.row_groups)

    # ---- public --------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.metadata.grid

    @property
    def codebook_size(self) -> int:
        return self.metadata.codebook_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle order of the next iteration (like DistributedSampler.set_epoch).
        With persistent DataLoader workers the workers keep the epoch they started with."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Rows this rank yields per epoch (all its DataLoader workers together)."""
        start, stop = _slice(self.num_rows, self.rank, self.world_size)
        return stop - start

    def steps_per_epoch(self, batch_size: int, num_workers: int = 0) -> int:
        """Full batches that EVERY rank gets from DataLoader(self, batch_size, num_workers): run
        this many steps per epoch on all ranks to keep DDP in lock-step (each DataLoader worker
        batches its own rows, so ranks can otherwise differ by a batch)."""
        workers = max(1, num_workers)
        counts = []
        for rank in range(self.world_size):
            start, stop = _slice(self.num_rows, rank, self.world_size)
            counts.append(sum((b - a) // batch_size for a, b in
                              (_slice(stop - start, w, workers) for w in range(workers))))
        return min(counts)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return _rows(self.blocks(worker_id, num_workers), self.fields)

    def blocks(self, worker_id: int = 0, num_workers: int = 1) -> Iterator["Block"]:
        """The rows that DataLoader worker `worker_id` of `num_workers` yields this epoch, as
        Blocks (keys, codes (n, h, w) int64 array, fields) in the same order: for consumers that
        batch arrays themselves instead of collating per-row dicts (the prior's trainer)."""
        blocks = self._read(self.pieces(worker_id, num_workers))
        if self.shuffle:
            blocks = _pool_shuffle(blocks, self.shuffle_buffer, self._rng(worker_id))
        return blocks

    def pieces(self, worker_id: int = 0, num_workers: int = 1) -> list[Piece]:
        """The row-group slices read by this rank's worker `worker_id` of `num_workers`."""
        groups = list(self.row_groups)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(groups)
        rank_start, rank_stop = _slice(self.num_rows, self.rank, self.world_size)
        start, stop = _slice(rank_stop - rank_start, worker_id, num_workers)
        return _pieces(groups, rank_start + start, rank_start + stop)

    # ---- reading -------------------------------------------------------------------------------
    def _filesystem(self):
        """This process's filesystem: async fsspec filesystems (s3fs, gcsfs) are not fork-safe,
        so a forked DataLoader worker makes its own."""
        if self._fs_pid != os.getpid():
            self.fs, _ = fsspec.core.url_to_fs(self.url)
            self._fs_pid = os.getpid()
        return self.fs

    def __getstate__(self):   # spawned workers: build the filesystem there, not pickled
        state = dict(self.__dict__)
        state["_fs_pid"] = None
        return state

    def _rng(self, worker_id: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, worker_id])

    def _read(self, pieces: list[Piece]) -> Iterator["Block"]:
        columns = [KEY, CODES, *self.fields]
        h, w = self.metadata.grid
        fs = self._filesystem()
        open_path, handle, parquet = None, None, None
        try:
            for piece in pieces:
                if piece.group.path != open_path:     # keep the file open across its row groups
                    if handle is not None:
                        handle.close()
                    open_path = piece.group.path
                    handle = fs.open(open_path, "rb")
                    parquet = pq.ParquetFile(handle)
                table = parquet.read_row_group(piece.group.index, columns=columns)
                table = table.slice(piece.start, piece.stop - piece.start)
                codes = codes_array(table.column(CODES), self.metadata, open_path, h * w)
                yield Block(table.column(KEY).to_pylist(), codes.reshape(-1, h, w),
                            {name: table.column(name).to_pylist() for name in self.fields})
        finally:
            if handle is not None:
                handle.close()


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    try:
        rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    except ValueError as e:
        raise UserError(f"CodesDataset: RANK / WORLD_SIZE must be integers ({e})") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"CodesDataset: rank {rank} is not in [0, world_size = {world_size})")
    return rank, world_size


def _scan(fs, paths: list[str], fields: tuple[str, ...] | None
          ) -> tuple[OutputMetadata, list[RowGroup], tuple[str, ...]]:
    """Read every file's footer (in parallel: object stores are latency-bound); check they all
    name one tokenizer and carry the requested fields (None: the kept fields all files have)."""
    def one(path):
        try:
            with fs.open(path, "rb") as f:
                md = pq.ParquetFile(f).metadata          # one footer read per file
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        schema = md.schema.to_arrow_schema()
        meta = metadata_from_schema(schema, path)
        names = set(schema.names)
        for name in fields or ():
            if name not in names:
                raise UserError(f"{path}: no column {name!r} to pass through (columns: "
                                f"{', '.join(sorted(names))}); pass fields=() or tokenize with "
                                f"--keep-fields {name}")
        kept = [n for n in schema.names if n not in (KEY, SHARD, CODES)]
        return meta, [RowGroup(path, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)], kept

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        results = list(pool.map(one, paths))
    metadata = require_same_tokenizer({p: r[0] for p, r in zip(paths, results)})
    groups = [g for _, gs, _ in results for g in gs if g.num_rows > 0]
    if fields is None:    # every kept field that every file has, in the first file's order
        fields = tuple(n for n in (results[0][2] if results else ()) if all(n in r[2] for r in results))
    return metadata, groups, fields


def _slice(n: int, part: int, parts: int) -> tuple[int, int]:
    return n * part // parts, n * (part + 1) // parts


def _pieces(groups: list[RowGroup], start: int, stop: int) -> list[Piece]:
    """The parts of `groups` (laid end to end) that cover global rows [start, stop)."""
    out, offset = [], 0
    for g in groups:
        lo, hi = max(start, offset), min(stop, offset + g.num_rows)
        if lo < hi:
            out.append(Piece(g, lo - offset, hi - offset))
        offset += g.num_rows
        if offset >= stop:
            break
    return out


def _rows(blocks: Iterator["Block"], fields: tuple[str, ...]) -> Iterator[dict]:
    for block in blocks:
        grids = torch.from_numpy(block.codes).unbind(0)   # one C++ call; per-row indexing is slow
        for i, key in enumerate(block.keys):
            row = {"key": key, "codes": grids[i]}
            for name in fields:
                row[name] = block.extra[name][i]
            yield row


def _pool_shuffle(blocks: Iterator["Block"], size: int, rng: np.random.Generator) -> Iterator["Block"]:
    """Pool whole row-group slices until they hold >= `size` rows, then emit the pool as one
    randomly permuted block. Rows are shuffled as arrays (numpy), never as thousands of live
    Python objects, which a classic row shuffle buffer would be (several times slower)."""
    pool: list[Block] = []
    pooled = 0
    for block in blocks:
        pool.append(block)
        pooled += len(block.keys)
        if pooled >= size:
            yield Block.permuted(pool, rng)
            pool, pooled = [], 0
    if pool:
        yield Block.permuted(pool, rng)
