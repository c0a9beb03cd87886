"""`vqtok tokenize`: WebDataset shards -> codes as Parquet on Ray (see docs/tokenize.md)."""
from __future__ import annotations

import json

import click


@click.command("tokenize")
@click.option("--tokenizer", required=True, help="Tokenizer directory or URL (from `vqtok train`).")
@click.option("--input", "inputs", required=True, multiple=True,
              help="Shard URL(s): brace ranges and globs, local/s3/gs/http. Repeatable.")
@click.option("--output", required=True, help="Output directory URL.")
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray).")
@click.option("--workers", default=0, show_default=True, type=int, help="Tokenizer workers; 0 = fill the cluster.")
@click.option("--gpus-per-worker", default=None, type=float, help="Default: 1 on GPU clusters, else 0.")
@click.option("--cpus-per-worker", default=None, type=float,
              help="Default: 1 on CPU clusters; on GPU nodes their CPU share (CPUs - 1 over GPUs).")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Images per encode call.")
@click.option("--max-error-rate", default=0.01, show_default=True, type=float,
              help="Exit non-zero when (failed samples + shard errors) / read exceeds this.")
@click.option("--keep-fields", default="", help="Comma-separated sample fields to pass through, e.g. cls,json.")
@click.option("--overwrite", is_flag=True, help="Delete an existing output (e.g. of another tokenizer) first.")
@click.option("--max-attempts", default=3, show_default=True, type=int, help="Attempts per shard.")
@click.option("--placement-timeout", default=300.0, show_default=True, type=float,
              help="Seconds with no worker placed or alive (e.g. every node lost) before the job stops; "
                   "rerun the same command to resume.")
@click.option("--shard-timeout", default=1800.0, show_default=True, type=float,
              help="Seconds one attempt may take to read and decode a shard; past it (a stalled read) the "
                   "attempt fails and is retried, up to --max-attempts.")
@click.option("--max-member-mib", default=256, show_default=True, type=int,
              help="A sample field (tar member) larger than this is an error row, never read into memory.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(tokenizer, inputs, output, address, workers, gpus_per_worker, cpus_per_worker, batch_size,
            max_error_rate, keep_fields, overwrite, max_attempts, placement_timeout, shard_timeout, max_member_mib,
            no_progress):
    """Tokenize image shards into OUTPUT/<shard>.parquet (key, shard, codes, kept fields)."""
    from pipelines.tokenize import TokenizeConfig, run_tokenize

    cfg = TokenizeConfig(tokenizer=tokenizer, inputs=list(inputs), output=output, address=address,
                         workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                         batch_size=batch_size, max_error_rate=max_error_rate, keep_fields=keep_fields,
                         overwrite=overwrite, max_attempts=max_attempts, placement_timeout=placement_timeout,
                         shard_timeout=shard_timeout, max_member_bytes=max_member_mib << 20, progress=not no_progress)
    summary = run_tokenize(cfg)
    click.echo(format_summary(summary))
    click.echo("summary: " + json.dumps(summary, sort_keys=True))
    if summary["failed_shards"]:
        raise click.ClickException(f"{len(summary['failed_shards'])} shard(s) failed; rerun the same "
                                   "command to retry them (finished shards are skipped)")
    if summary["error_rate"] > max_error_rate:
        raise click.ClickException(f"error rate {summary['error_rate']:.4f} exceeds --max-error-rate "
                                   f"{max_error_rate}; see {output.rstrip('/')}/_errors/")


def format_summary(s: dict) -> str:
    n = s["samples"]
    lines = [f"tokenized {s['done']}/{s['shards']} shards ({s['skipped']} already done, skipped); "
             f"{n['ok']} samples ok, {n['failed']} failed, {s['shard_errors']} shard errors; "
             f"error rate {s['error_rate']:.4f}; {s['wall_s']:.1f}s ({s['samples_per_s']:.0f} samples/s, "
             f"start-up {s['startup_s']:.1f}s)"]
    if n["failed_by_reason"]:
        lines.append("failed by reason: " + ", ".join(f"{k}={v}" for k, v in n["failed_by_reason"].items()))
    for shard, why in s["failed_shards"].items():
        lines.append(f"shard {shard} FAILED: {why}")
    if s["retries"] or s.get("workers_lost"):
        lines.append(f"{s['retries']} shard attempt(s) retried; {s.get('workers_lost', 0)} worker(s) lost, "
                     f"{s['replaced_workers']} replaced, {s.get('workers_started', 0)} started in all")
    return "\n".join(lines)
