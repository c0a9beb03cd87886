"""`vqtok tokenize` driver: list shards, take the output's lease, claim the output, skip finished
shards, run the rest on Ray, write _SUCCESS, release the lease, return the summary."""
from __future__ import annotations

import collections
import math
import time

from ..shards.urls import list_shards
from ..errors import UserError
from ..ray_utils import ray_session
from .config import TokenizeConfig
from .lease import OutputLease
from .outputs import OutputDir
from .scheduler import ShardScheduler
from .tokenizer_info import tokenizer_metadata


def run_tokenize(cfg: TokenizeConfig) -> dict:
    t0 = time.perf_counter()
    shards = list_shards(cfg.inputs)
    meta = tokenizer_metadata(cfg.tokenizer)
    out = OutputDir(cfg.output)
    out.check_location()
    about = {"inputs": cfg.inputs[:10], "shards": len(shards), "tokenizer": cfg.tokenizer}
    with OutputLease(out.url, cfg.lease_heartbeat, cfg.lease_stale, about) as lease:
        out.prepare(meta, cfg.keep_fields, cfg.overwrite)
        done = out.finished([s for _, s in shards], meta.tokenizer_sha256)
        todo = [(url, s) for url, s in shards if s not in done]
        outcome, startup = None, 0.0
        if todo:
            out.clear_success()
            ray_t0 = time.perf_counter()
            with ray_session(cfg.address) as ray:
                outcome, startup = _run_on_ray(ray, cfg, meta, todo, len(shards), len(done), ray_t0, lease)
        manifests = {**done, **(outcome.manifests if outcome else {})}
        lease.verify()          # the index and _SUCCESS are written only by the lease's holder
        out.record_finished(manifests, meta.tokenizer_sha256, changed=outcome is not None)
        summary = summarize(shards, manifests, outcome, len(done), time.perf_counter() - t0, startup)
        if not summary["failed_shards"]:
            out.mark_success(summary)
    return summary


def _run_on_ray(ray, cfg: TokenizeConfig, meta, todo, total: int, skipped: int, ray_t0: float,
                lease: OutputLease):
    """(outcome, seconds from Ray's start or join to the first workers ready)."""
    from .worker import TokenizeWorker

    _, cpus, gpus = pool_size(live_nodes(ray), cfg, len(todo))
    actor_cls = ray.remote(TokenizeWorker).options(**actor_options(cpus, gpus))

    def make_actor():
        return actor_cls.remote(cfg.tokenizer, meta.to_json(), out_url(cfg), cfg.keep_fields,
                                cfg.batch_size, cpus, max_member_bytes=cfg.max_member_bytes,
                                lease_id=lease.job_id, shard_timeout=cfg.shard_timeout)

    def desired() -> int:     # the workers the live cluster has room for now (--workers: at most)
        fit = fitting_workers(live_nodes(ray), cpus, gpus)
        return min(cfg.workers, fit) if cfg.workers else fit

    bar = _progress(cfg.progress, total, skipped)
    counts = collections.Counter()

    def on_done(shard, manifest):
        counts["ok"] += manifest["counts"]["ok"]
        counts["failed"] += manifest["counts"]["failed"] + manifest["counts"]["shard_errors"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(samples=counts["ok"], errors=counts["failed"], refresh=False)

    scheduler = ShardScheduler(ray, make_actor, desired, cfg.max_attempts, on_done,
                               placement_timeout=cfg.placement_timeout, check=lease.raise_if_lost,
                               call_timeout=CALL_TIMEOUTS * cfg.shard_timeout)
    run_t0 = time.perf_counter()
    try:
        outcome = scheduler.run(todo)
    finally:
        if bar is not None:
            bar.close()
    return outcome, run_t0 - ray_t0 + outcome.startup_s


# the scheduler's backstop of --shard-timeout: a call may wait for a slot behind one running shard
# (up to one timeout), then run its own (another), then write; past 3 timeouts its worker is stuck
CALL_TIMEOUTS = 3


def actor_options(cpus: float, gpus: float) -> dict:
    """Ray options of one TokenizeWorker. A threaded actor: the scheduler keeps up to slots + 1
    process() calls on it (slots from its ready(), derived from its CPUs), plus ready() itself;
    the worker bounds how many run at once. Never restarted by Ray: the scheduler replaces lost
    workers only where the cluster has room."""
    return {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0,
            "max_concurrency": max(1, int(cpus)) + 2}


def out_url(cfg: TokenizeConfig) -> str:
    return cfg.output.rstrip("/")


# CPUs of each GPU node left to Ray's own processes (raylet, object store, the driver) when
# accelerator workers take their node's CPU share
RESERVED_CPUS_PER_NODE = 1.0


def live_nodes(ray) -> list[dict]:
    """The total resources of each live node of the cluster, e.g. [{"CPU": 96.0, "GPU": 8.0}]."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def pool_size(nodes: list[dict], cfg: TokenizeConfig, shards: int) -> tuple[int, float, float]:
    """(workers, cpus per worker, gpus per worker) for the live nodes' resources."""
    total_cpus = sum(float(n.get("CPU", 0)) for n in nodes)
    total_gpus = sum(float(n.get("GPU", 0)) for n in nodes)
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if total_gpus >= 1 else 0.0)
    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else default_cpus(nodes, gpus)
    fit = fitting_workers(nodes, cpus, gpus)
    if fit == 0:
        raise UserError(f"one worker needs {cpus:g} CPU and {gpus:g} GPU, no node of the Ray cluster has that "
                        f"({len(nodes)} node(s), {total_cpus:g} CPU and {total_gpus:g} GPU in all); "
                        "lower --cpus-per-worker/--gpus-per-worker")
    workers = min(cfg.workers, fit) if cfg.workers else fit
    return max(1, min(workers, shards)), cpus, gpus


def default_cpus(nodes: list[dict], gpus: float) -> float:
    """CPU workers: 1 (one worker per CPU). Accelerator workers: their node's CPU share, its CPUs
    less RESERVED_CPUS_PER_NODE over the workers its accelerators take; on a mixed cluster the
    smallest share of any accelerator node, so that every accelerator gets a worker."""
    if gpus <= 0:
        return 1.0
    shares = [(float(n.get("CPU", 0)) - RESERVED_CPUS_PER_NODE) / _per_node(float(n.get("GPU", 0)), gpus)
              for n in nodes if _per_node(float(n.get("GPU", 0)), gpus) >= 1]
    return float(max(1, int(min(shares)))) if shares else 1.0


def fitting_workers(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) the nodes hold, counted node by node (a worker cannot
    span nodes)."""
    fit = 0
    for n in nodes:
        by_cpu = _per_node(float(n.get("CPU", 0)), cpus)
        fit += min(by_cpu, _per_node(float(n.get("GPU", 0)), gpus)) if gpus > 0 else by_cpu
    return fit


def _per_node(have: float, need: float) -> int:
    return int(have / need + 1e-9) if need > 0 else 0


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
        "workers_started": outcome.workers_started if outcome else 0,
        "workers_lost": outcome.workers_lost if outcome else 0,
        "samples": {"read": read, "ok": ok, "failed": failed,
                    "failed_by_reason": dict(sorted(reasons.items()))},
        "shard_errors": shard_errors,
        "error_rate": (bad / denominator) if denominator else (1.0 if failed_shards else 0.0),
        "wall_s": round(wall, 3), "startup_s": round(startup, 3),
        "stage_s": {k: round(v, 3) for k, v in sorted(durations.items())},
        "samples_per_s": round(ok / wall, 1) if wall > 0 and not math.isnan(wall) else 0.0,
    }
