"""`vqtok inspect`: what a tokenize output holds, read from footers, manifests and error files
(no code rows are read)."""
from __future__ import annotations

from collections import Counter

import fsspec
import pyarrow.parquet as pq

from tokenizer.storage import join_url

from .errors import UserError
from .manifests import read_manifests
from .output_format import (DATA_SUFFIX, ERRORS_DIR, list_data_files, read_metadata, require_same_tokenizer,
                            shard_files, success_path)


def inspect_output(output: str) -> dict:
    fs, paths = list_data_files(output)
    metas, rows, row_groups = {}, 0, 0
    for path in paths:
        metas[path] = read_metadata(path, fs)
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        row_groups += md.num_row_groups
    meta = require_same_tokenizer(metas)
    root = fsspec.core.url_to_fs(output)[1].rstrip("/")
    files = shard_files(fs, root)
    committed = files.committed()
    manifests = _manifests(fs, [m for _, m in committed.values()])
    errors = _errors(fs, join_url(root, ERRORS_DIR))
    failed_shards = sorted({shard for shard, key, _ in errors if key is None})
    uncommitted = sorted(set(files.data) - set(committed))
    return {
        "output": output,
        "rows": rows,
        "data_files": len(paths),
        "row_groups": row_groups,
        "complete": fs.exists(success_path(root)),
        "shards_done": len(committed),
        "shards_failed": len(failed_shards),
        "failed_shards": failed_shards,
        "uncommitted_shards": uncommitted,   # a data file but no manifest: an interrupted shard
        "errors": len(errors),
        "errors_by_reason": _errors_by_reason(manifests, errors),
        "tokenizer_sha256": meta.tokenizer_sha256,
        "codebook_size": meta.codebook_size,
        "grid": list(meta.grid),
        "channels": meta.channels,
        "resolution": meta.resolution,
        "preprocessing": meta.preprocessing,
        "format_version": meta.version,
        "samples_read": sum(int(_counts(m).get("read", 0)) for m in manifests.values()),
        "stage_seconds": _stage_seconds(manifests),
    }


def _manifests(fs, paths: list[str]) -> dict[str, dict]:
    out = {}
    for path, data in read_manifests(fs, paths).items():      # concurrent: one round trip each
        if isinstance(data, Exception):
            raise UserError(f"{path}: unreadable shard manifest ({data})")
        out[path] = data if isinstance(data, dict) else {}
    return out


def _errors(fs, root: str) -> list[tuple[str, str | None, str]]:
    if not fs.isdir(root):
        return []
    rows = []
    for path in sorted(p for p in fs.find(root) if p.endswith(DATA_SUFFIX)):
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["shard", "key", "error"])
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: unreadable error file ({e})") from None
        rows += zip(*(table.column(c).to_pylist() for c in ("shard", "key", "error")))
    return rows


def _counts(manifest: dict) -> dict:
    counts = manifest.get("counts")
    return counts if isinstance(counts, dict) else {}


def _errors_by_reason(manifests: dict[str, dict], errors: list) -> dict[str, int]:
    """Sample errors by the reason category each shard's manifest counted (failed_by_reason);
    shard-level errors (key null in _errors) as 'shard_error'."""
    total: Counter = Counter()
    for m in manifests.values():
        reasons = _counts(m).get("failed_by_reason") or {}
        if isinstance(reasons, dict):
            total.update({str(k): int(v) for k, v in reasons.items()})
    counted = sum(total.values())
    sample_errors = [e for _, key, e in errors if key is not None]
    if counted < len(sample_errors):     # error rows no manifest accounts for (e.g. unfinished shard)
        total["unfinished_shard"] += len(sample_errors) - counted
    shard_errors = sum(1 for _, key, _ in errors if key is None)
    if shard_errors:
        total["shard_error"] += shard_errors
    return dict(total.most_common())


def _stage_seconds(manifests: dict[str, dict]) -> dict[str, float]:
    total: Counter = Counter()
    for m in manifests.values():
        durations = m.get("durations_s") or {}
        if isinstance(durations, dict):
            total.update({k: float(v) for k, v in durations.items() if isinstance(v, (int, float))})
    return {k: round(v, 3) for k, v in total.items()}


def format_report(info: dict) -> str:
    """Human-readable summary."""
    lines = [
        f"output        {info['output']}  ({'complete: _SUCCESS' if info['complete'] else 'INCOMPLETE: no _SUCCESS'})",
        f"rows          {info['rows']:,} in {info['data_files']} files ({info['row_groups']} row groups)",
        f"shards        {info['shards_done']} done, {info['shards_failed']} failed",
        f"errors        {info['errors']:,}",
    ]
    for reason, n in info["errors_by_reason"].items():
        lines.append(f"  {n:>10,}  {reason}")
    if info["uncommitted_shards"]:
        lines.append(f"  {len(info['uncommitted_shards'])} data file(s) without a manifest (interrupted; "
                     f"rerun tokenize to finish them): {', '.join(info['uncommitted_shards'][:5])}")
    for shard in info["failed_shards"][:10]:
        lines.append(f"  failed shard  {shard}")
    if len(info["failed_shards"]) > 10:
        lines.append(f"  ... and {len(info['failed_shards']) - 10} more failed shards")
    lines += [
        f"tokenizer     sha256 {info['tokenizer_sha256']}",
        f"grid          {info['grid'][0]} x {info['grid'][1]} codes, codebook size {info['codebook_size']:,}",
        f"images        {info['channels']} channel(s), {info['resolution']} x {info['resolution']}",
    ]
    if info["stage_seconds"]:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in info["stage_seconds"].items())
        lines.append(f"stage time    {stages} (summed over shards)")
    return "\n".join(lines)
