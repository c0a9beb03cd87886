"""`vqtok tokenize` driver: list shards, claim the output, skip finished shards, run the rest on
Ray, write _SUCCESS, return the summary."""
from __future__ import annotations

import collections
import math
import time

from ..data import expand_urls
from ..errors import UserError
from ..output_format import shard_name
from ..ray_utils import ray_session
from .config import TokenizeConfig
from .outputs import OutputDir
from .scheduler import ShardScheduler
from .tokenizer_info import tokenizer_metadata


def list_shards(patterns: list[str]) -> list[tuple[str, str]]:
    """[(url, shard name)]; two inputs with one name would write one file, so that is refused."""
    urls = expand_urls(patterns)
    seen: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise UserError(f"two input shards have the same name {name!r} ({seen[name]} and {url}); "
                            "their outputs would collide in one OUTPUT/<name>.parquet")
        seen[name] = url
    return [(url, name) for name, url in seen.items()]


def run_tokenize(cfg: TokenizeConfig) -> dict:
    t0 = time.perf_counter()
    shards = list_shards(cfg.inputs)
    meta = tokenizer_metadata(cfg.tokenizer)
    out = OutputDir(cfg.output)
    out.prepare(meta, cfg.keep_fields, cfg.overwrite)
    done = out.finished([s for _, s in shards], meta.tokenizer_sha256)
    todo = [(url, s) for url, s in shards if s not in done]
    outcome, startup = None, 0.0
    if todo:
        out.clear_success()
        ray_t0 = time.perf_counter()
        with ray_session(cfg.address) as ray:
            outcome, startup = _run_on_ray(ray, cfg, meta, todo, len(shards), len(done), ray_t0)
    manifests = {**done, **(outcome.manifests if outcome else {})}
    out.record_finished(manifests, meta.tokenizer_sha256, changed=outcome is not None)
    summary = summarize(shards, manifests, outcome, len(done), time.perf_counter() - t0, startup)
    if not summary["failed_shards"]:
        out.mark_success(summary)
    return summary


def _run_on_ray(ray, cfg: TokenizeConfig, meta, todo, total: int, skipped: int, ray_t0: float):
    """(outcome, seconds from Ray's start or join to every worker ready)."""
    from .worker import TokenizeWorker

    workers, cpus, gpus = pool_size(ray.cluster_resources(), cfg, len(todo))
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)(TokenizeWorker)

    def make_actor():
        return actor_cls.remote(cfg.tokenizer, meta.to_json(), out_url(cfg), cfg.keep_fields,
                                cfg.batch_size, cpus)

    bar = _progress(cfg.progress, total, skipped)
    counts = collections.Counter()

    def on_done(shard, manifest):
        counts["ok"] += manifest["counts"]["ok"]
        counts["failed"] += manifest["counts"]["failed"] + manifest["counts"]["shard_errors"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(samples=counts["ok"], errors=counts["failed"], refresh=False)

    scheduler = ShardScheduler(ray, make_actor, workers, cfg.max_attempts, on_done)
    try:
        actors = scheduler.start()
        startup = time.perf_counter() - ray_t0
        outcome = scheduler.run(actors, todo)
    finally:
        if bar is not None:
            bar.close()
    return outcome, startup


def out_url(cfg: TokenizeConfig) -> str:
    return cfg.output.rstrip("/")


def pool_size(resources: dict, cfg: TokenizeConfig, shards: int) -> tuple[int, float, float]:
    """(workers, cpus per worker, gpus per worker) for the cluster's resources."""
    total_cpus, total_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if total_gpus >= 1 else 0.0)
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    elif gpus > 0:   # decoders per GPU worker: a share of the node's CPUs, at most 4
        cpus = float(max(1, min(4, int(total_cpus // max(total_gpus / gpus, 1)))))
    else:
        cpus = 1.0
    if gpus > total_gpus or cpus > total_cpus:
        raise UserError(f"one worker needs {cpus:g} CPU and {gpus:g} GPU, the Ray cluster has "
                        f"{total_cpus:g} CPU and {total_gpus:g} GPU; lower --cpus-per-worker/--gpus-per-worker")
    fit = int(total_gpus // gpus) if gpus > 0 else int(total_cpus // cpus)
    if gpus > 0:
        fit = min(fit, int(total_cpus // cpus))
    workers = cfg.workers or fit
    return max(1, min(workers, shards)), cpus, gpus


def _progress(enabled: bool, total: int, skipped: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=skipped, unit="shard", desc="tokenize", dynamic_ncols=True)


def summarize(shards, manifests: dict, outcome, skipped: int, wall: float, startup: float) -> dict:
    read = sum(m["counts"]["read"] for m in manifests.values())
    ok = sum(m["counts"]["ok"] for m in manifests.values())
    failed = sum(m["counts"]["failed"] for m in manifests.values())
    shard_errors = sum(m["counts"]["shard_errors"] for m in manifests.values())
    reasons = collections.Counter()
    for m in manifests.values():
        reasons.update(m["counts"]["failed_by_reason"])
    failed_shards = dict(outcome.failed) if outcome else {}
    bad = failed + shard_errors + len(failed_shards)
    denominator = read + shard_errors + len(failed_shards)
    durations = collections.Counter()
    for m in manifests.values():
        durations.update(m["durations_s"])
    return {
        "shards": len(shards), "done": len(manifests), "skipped": skipped,
        "failed_shards": failed_shards, "retries": outcome.retries if outcome else 0,
        "replaced_workers": outcome.replaced_workers if outcome else 0,
        "samples": {"read": read, "ok": ok, "failed": failed,
                    "failed_by_reason": dict(sorted(reasons.items()))},
        "shard_errors": shard_errors,
        "error_rate": (bad / denominator) if denominator else (1.0 if failed_shards else 0.0),
        "wall_s": round(wall, 3), "startup_s": round(startup, 3),
        "stage_s": {k: round(v, 3) for k, v in sorted(durations.items())},
        "samples_per_s": round(ok / wall, 1) if wall > 0 and not math.isnan(wall) else 0.0,
    }
