"""Test helper: a tiny random-weight tokenizer and tokenize outputs written exactly per the
output contract (pipelines/output_format.py), with codes from the real model's encode."""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipelines import output_format as fmt
from pipelines.tokenize.tokenizer_info import tokenizer_metadata
from tokenizer import VQVAE, VQVAEConfig


def tiny_model(codebook_size: int = 16, channels: int = 1, resolution: int = 8, seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    config = VQVAEConfig(in_channels=channels, resolution=resolution, hidden=8, res_hidden=4,
                         num_res_blocks=0, num_downsamples=1, code_dim=4,
                         quantizer={"codebook_size": codebook_size, "kmeans_init": False})
    return VQVAE(config).eval()


def save_tiny_model(path, **kw) -> VQVAE:
    model = tiny_model(**kw)
    model.save_pretrained(str(path))
    return model


def output_metadata(model: VQVAE) -> fmt.OutputMetadata:
    """The metadata `vqtok tokenize` writes into the data files of `model`'s codes: the driver's
    tokenizer_metadata, read from the model saved as a tokenizer directory."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return tokenizer_metadata(folder)


def images(model: VQVAE, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c, r = model.config.in_channels, model.config.resolution
    return torch.rand(n, c, r, r, generator=g)


def write_output(out, model: VQVAE, shards: dict[str, int], row_group_size: int = 4,
                 keys: dict[str, list[str]] | None = None, errors: dict[str, list] | None = None,
                 meta: fmt.OutputMetadata | None = None, success: bool = True,
                 codes_type: pa.DataType | None = None, labelled: bool = True) -> dict[str, dict]:
    """Write OUTPUT/<shard>.parquet (+ _errors, _manifest, _SUCCESS) for shards {name: rows}.
    Returns {key: {"shard", "codes" (h, w) int64 array, "cls", "image"}} of every code row."""
    out = str(out)
    os.makedirs(out, exist_ok=True)
    meta = meta or output_metadata(model)
    schema = fmt.data_schema(meta, [pa.field("cls", pa.int64())] if labelled else [])
    if codes_type is not None:
        schema = schema.set(schema.get_field_index("codes"), pa.field("codes", codes_type))
    rows: dict[str, dict] = {}
    for i, (shard, n) in enumerate(sorted(shards.items())):
        shard_keys = (keys or {}).get(shard) or [f"{shard}-{j:06d}" for j in range(n)]
        x = images(model, n, seed=1000 + i)
        codes = model.encode(x).numpy() if n else np.zeros((0, *model.grid), np.int64)
        cls = [(j * 7 + i) % 10 for j in range(n)]
        columns = {"key": shard_keys, "shard": [shard] * n, "codes": [c.reshape(-1).tolist() for c in codes]}
        if labelled:
            columns["cls"] = cls
        table = pa.table(columns, schema=schema)
        pq.write_table(table, fmt.data_path(out, shard), row_group_size=row_group_size,
                       compression="zstd")
        for j, key in enumerate(shard_keys):
            rows[key] = {"shard": shard, "codes": codes[j], "cls": cls[j], "image": x[j]}
        shard_errors = (errors or {}).get(shard, [])
        _write_errors(out, shard, shard_errors)
        _write_manifest(out, shard, n, shard_errors, meta)
    if success:
        open(fmt.success_path(out), "w").close()
    return rows


def _write_errors(out: str, shard: str, errors: list) -> None:
    os.makedirs(os.path.join(out, fmt.ERRORS_DIR), exist_ok=True)
    table = pa.table({"shard": [shard] * len(errors), "key": [k for k, _ in errors],
                      "error": [e for _, e in errors]}, schema=fmt.errors_schema())
    pq.write_table(table, fmt.errors_path(out, shard))


def _write_manifest(out: str, shard: str, ok: int, errors: list, meta) -> None:
    """In the layout `vqtok tokenize` writes (pipelines/tokenize/shard_job.py)."""
    os.makedirs(os.path.join(out, fmt.MANIFEST_DIR), exist_ok=True)
    sample_errors = [e for k, e in errors if k is not None]
    failed: dict[str, int] = {}
    for error in sample_errors:
        reason = error.split(":")[0]
        failed[reason] = failed.get(reason, 0) + 1
    shard_error = next((e for k, e in errors if k is None), None)
    manifest = {"version": 1, "shard": shard, "tokenizer_sha256": meta.tokenizer_sha256,
                "counts": {"read": ok + len(sample_errors), "ok": ok, "failed": len(sample_errors),
                           "failed_by_reason": failed, "shard_errors": int(shard_error is not None)},
                "shard_error": shard_error,
                "durations_s": {"read": 0.1, "decode": 0.2, "encode": 0.3, "write": 0.05}}
    with open(fmt.manifest_path(out, shard), "w") as f:
        json.dump(manifest, f)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members) -> None:
    """members: [(member name, bytes)] -> a tar shard at `path`."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
