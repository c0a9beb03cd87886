"""Code rows read back from a tokenize output: the codes column as an (n, h*w) array, checked
against the grid and the codebook its file's metadata names (CodesDataset reads rows with it,
`vqtok verify` checks every row with it)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import UserError
from .output_format import OutputMetadata


def codes_array(column: pa.ChunkedArray, meta: OutputMetadata, path: str, size: int) -> np.ndarray:
    """list<int> column -> (n, size) int64, checked against the grid and the codebook."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        raise UserError(f"{path}: {array.null_count} rows have null codes")
    lengths = np.diff(array.offsets.to_numpy(zero_copy_only=False))
    if len(lengths) and (lengths != size).any():
        bad = int(np.flatnonzero(lengths != size)[0])
        raise UserError(f"{path}: a row has {int(lengths[bad])} codes, the grid {meta.grid} "
                        f"needs {size}")
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= meta.codebook_size):
        bad = values[(values < 0) | (values >= meta.codebook_size)]
        raise UserError(f"{path}: codes outside [0, {meta.codebook_size}) ({bad.size} values, "
                        f"e.g. {int(bad[0])})")
    return values.reshape(len(array), size)
