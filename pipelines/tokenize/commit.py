"""Commit one shard's results: data Parquet, error Parquet, manifest — each written atomically.

Commit order is: the old manifest removed, errors, data, the new manifest. The manifest is the
shard's commit marker (with the sha256 of the files it commits), so it is taken away before a
retry rewrites a committed shard's files: an attempt interrupted half-way leaves a shard without
a manifest (not done, redone by the next run), never a manifest describing other bytes. A retry
rewrites the same files under the same names, so nothing is duplicated.
Local files are written under OUTPUT/_tmp/, fsynced and renamed into place; object stores get one
PUT of the finished bytes (atomic per object): tokenizer.storage.write_bytes_atomic.
"""
from __future__ import annotations

import hashlib
import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenizer.storage import join_url, write_bytes_atomic

from ..samples import printable
from ..output_format import OutputMetadata, codes_numpy_dtype, data_schema, errors_path, errors_schema, manifest_path
from .lease import check_holder

TMP_DIR = "_tmp"
ROW_GROUP_ROWS = 32768
INT_FIELDS = ("cls",)   # kept fields stored as int64; every other kept field is UTF-8 text


def kept_field_type(name: str) -> pa.DataType:
    return pa.int64() if name.rsplit(".", 1)[-1] in INT_FIELDS else pa.string()


def kept_field_value(name: str, raw: bytes | None):
    """bytes -> python value for the column; raises ValueError when it does not fit the type."""
    if raw is None:
        return None
    text = raw.decode("utf-8")
    return int(text.strip()) if kept_field_type(name) == pa.int64() else text


def put_atomic(url: str, data: bytes, output: str) -> None:
    """write_bytes_atomic with the temporary file under OUTPUT/_tmp (cleared at the next start)."""
    write_bytes_atomic(url, data, tmp_dir=join_url(output, TMP_DIR))


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def file_digest(data: bytes) -> dict:
    """{"sha256", "bytes"} of a file's bytes as committed (recorded in the shard's manifest)."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def codes_table(meta: OutputMetadata, shard: str, keys: list[str], codes: np.ndarray,
                kept: dict[str, list]) -> pa.Table:
    """codes: (N, h*w) int16/int32 -> table with key, shard, codes list, kept fields."""
    schema = data_schema(meta, [pa.field(name, kept_field_type(name)) for name in kept])
    value_type = schema.field("codes").type.value_type
    n, width = codes.shape if codes.ndim == 2 else (0, meta.num_codes)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width, type=pa.int32())
    values = pa.array(codes.reshape(-1).astype(codes_numpy_dtype(meta.codebook_size), copy=False),
                      type=value_type)
    columns = [pa.array(keys, type=pa.string()), pa.array([shard] * n, type=pa.string()),
               pa.ListArray.from_arrays(offsets, values, type=schema.field("codes").type)]
    columns += [pa.array(kept[name], type=kept_field_type(name)) for name in kept]
    return pa.Table.from_arrays(columns, schema=schema)


def errors_table(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    """Error rows -> table; text from a tar (member names in messages) is made valid UTF-8, as
    Parquet needs, so a crafted name costs its row, never the shard's write."""
    rows = [tuple(None if v is None else printable(v) for v in row) for row in rows]
    shards, keys, errors = zip(*rows) if rows else ((), (), ())
    return pa.Table.from_arrays([pa.array(list(shards), pa.string()), pa.array(list(keys), pa.string()),
                                 pa.array(list(errors), pa.string())], schema=errors_schema())


class ShardCommitter:
    """Commits one shard's outputs in the order: old manifest removed -> errors -> data -> manifest.
    With `lease_id` (the job's), nothing is written unless the output's lease still names it."""

    def __init__(self, output: str, lease_id: str | None = None):
        self.output = output
        self.lease_id = lease_id

    def commit_data(self, shard: str, data: bytes, data_url: str, errors: list) -> dict:
        """Un-commit the shard (remove its manifest, if an earlier attempt wrote one), then commit
        the error file (or remove a stale one) and the data file; returns {"data": digest,
        "errors": digest or None} for the manifest, so that `vqtok verify` can prove later that
        the files are still the bytes committed."""
        if self.lease_id is not None:      # a job whose lease was taken over writes nothing more
            check_holder(self.output, self.lease_id, shard)
        remove(manifest_path(self.output, shard))
        errors_digest = None
        if errors:
            errors_bytes = parquet_bytes(errors_table(errors))
            put_atomic(errors_path(self.output, shard), errors_bytes, self.output)
            errors_digest = file_digest(errors_bytes)
        else:
            remove(errors_path(self.output, shard))   # stale errors of an earlier attempt
        put_atomic(data_url, data, self.output)
        return {"data": file_digest(data), "errors": errors_digest}

    def commit_manifest(self, shard: str, manifest: dict) -> None:
        put_atomic(manifest_path(self.output, shard), json.dumps(manifest, indent=1).encode(), self.output)
