"""CodesDataset throughput against a bulk pyarrow read of the same files, in one run.

    python -m benchmarks.codes_dataset [--rows 60000] [--grid 7] [--codebook 512]

Writes a synthetic tokenize output (12 shards, zstd, the contract's schema) to a temporary
directory, then times: a bulk pyarrow read into one (N, h, w) array (the ceiling for a
row-at-a-time reader), CodesDataset iteration, and a DataLoader (batch 256, 0 workers) with and
without shuffling. Each is the best of 3 runs. Prints rows/s and each one's ratio to the bulk
read. Run it as a module (`python -m benchmarks.codes_dataset`).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader

from pipelines import CodesDataset
from pipelines import output_format as fmt


def write_output(root: str, rows: int, grid: int, k: int, shards: int = 12) -> None:
    meta = fmt.OutputMetadata("0" * 64, k, (grid, grid), 1, grid * 4, "benchmark")
    schema = fmt.data_schema(meta, [pa.field("cls", pa.int64())])
    rng = np.random.default_rng(0)
    per = rows // shards
    width = grid * grid
    for s in range(shards):
        codes = rng.integers(0, k, (per, width)).astype(np.int16)
        offsets = pa.array(np.arange(per + 1, dtype=np.int32) * width)
        table = pa.Table.from_arrays(
            [pa.array([f"{s}-{i}" for i in range(per)]), pa.array([str(s)] * per),
             pa.ListArray.from_arrays(offsets, pa.array(codes.reshape(-1)), type=schema.field("codes").type),
             pa.array(rng.integers(0, 10, per))], schema=schema)
        pq.write_table(table, fmt.data_path(root, f"s{s:04d}"), row_group_size=32768, compression="zstd")
    open(fmt.success_path(root), "w").close()


def bulk(root: str, grid: int) -> int:
    _, paths = fmt.list_data_files(root)
    n = 0
    for path in paths:
        column = pq.read_table(path, columns=["key", "codes", "cls"]).column("codes").combine_chunks()
        n += len(column.flatten().to_numpy().astype(np.int64).reshape(-1, grid, grid))
    return n


def timed(fn, repeat: int = 3) -> tuple[int, float]:
    """(rows, best seconds of `repeat` runs): the best run is the least disturbed by a busy CPU."""
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        best = min(best or float("inf"), time.perf_counter() - t)
    return n, best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--codebook", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_output(root, args.rows, args.grid, args.codebook)
        runs = {"pyarrow bulk read (ceiling)": lambda: bulk(root, args.grid)}
        for shuffle in (False, True):
            name = "shuffled" if shuffle else "in order"
            runs[f"CodesDataset iteration, {name}"] = lambda s=shuffle: sum(1 for _ in CodesDataset(root, shuffle=s))
            runs[f"DataLoader(batch 256), {name}"] = lambda s=shuffle: sum(
                len(b["key"]) for b in DataLoader(CodesDataset(root, shuffle=s), batch_size=256))
        results = {name: timed(fn) for name, fn in runs.items()}
    base = results["pyarrow bulk read (ceiling)"]
    base_rate = base[0] / base[1]
    print(f"{args.rows} rows of {args.grid}x{args.grid} codes, K={args.codebook}")
    for name, (n, s) in results.items():
        print(f"  {name:<40} {n / s:>12,.0f} rows/s   {n / s / base_rate:6.3f}x bulk")


if __name__ == "__main__":
    main()
