"""`vqtok tokenize` (in a process of its own) on a multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): a worker
node killed mid-job, a node added mid-job, every node lost (the placement timeout, then a rerun
that resumes). The head has no CPUs, so workers run only on the worker nodes the tests add and
remove. Every test checks that every sample is in the output exactly once."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import tok_data as td
from conftest import free_ports
from test_tokenize_ray import expected_codes, read_rows

# a node whose raylet stops answering is declared dead after ~4 s instead of Ray's ~15 s; not
# faster: on a loaded machine a live raylet can miss a few sub-second checks and be declared dead
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster():
    """A head node with 0 CPUs (no tokenize worker fits there) on 127.0.0.1; tests add worker
    nodes and remove them again. Token auth stays off on both sides, whatever ~/.ray holds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        # Ray caches the mode when first imported (an earlier test may have imported it in token
        # mode): re-read it, so the cluster this process starts has token auth off too
        from pipelines.ray_utils import set_auth_mode
        set_auth_mode(False)
        from ray.cluster_utils import Cluster

        temp_dir = tempfile.mkdtemp(prefix="vqe-", dir="/tmp")   # short: Unix socket paths are limited
        gcs_port, agent_port = free_ports(2)
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "gcs_server_port": gcs_port, "dashboard_agent_listen_port": agent_port,
            "temp_dir": temp_dir, "_system_config": FAST_NODE_DEATH})
        try:
            yield c
        finally:
            c.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def nodes(cluster):
    """add(cpus) -> node; every node added is removed after the test."""
    added = []

    def add(cpus=1):
        node = cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
        added.append(node)
        return node

    yield add
    for node in added:      # gracefully: the node deregisters at once, the next test never sees it
        if node in cluster.worker_nodes:
            cluster.remove_node(node, allow_graceful=True)


SHARDS, PER_SHARD = 16, 1500      # the node-loss tests' job
JOIN_SHARDS = 40                   # the node-join test's: long enough for a node to join and start a worker


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 shards of 1500 Fashion-MNIST training images: 0.3-0.5 s each for one worker with the
    tiny tokenizer, so a job is still running seconds after its first commit. `pattern` names
    the first 16, `all` every shard."""
    tok = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(tok)
    d = tmp_path_factory.mktemp("elastic")
    images, labels = td.fashion_mnist(JOIN_SHARDS * PER_SHARD, split="train")
    truth = {}
    for s in range(JOIN_SHARDS):
        part = slice(s * PER_SHARD, (s + 1) * PER_SHARD)
        samples = td.fmnist_samples(images[part], labels[part], f"s{s}-", s * PER_SHARD)
        td.write(os.path.join(d, f"train-{s:06d}.tar"), td.tar_bytes(samples))
        truth.update({key: (img, int(lab)) for (key, _), img, lab in zip(samples, images[part], labels[part])})
    return {"tok": str(tok), "pattern": f"{d}/train-{{000000..{SHARDS - 1:06d}}}.tar", "all": f"{d}/train-*.tar",
            "truth": truth,
            "codes": expected_codes(str(tok), truth)}


def check_rows(out, data, shards: int = SHARDS) -> None:
    """Every sample of the first `shards` input shards exactly once (read_rows refuses a key
    twice), with its codes, label and shard."""
    rows = read_rows(str(out))
    assert len(rows) == shards * PER_SHARD
    assert set(rows) == {key for key in data["truth"] if _shard_of(key) < shards}
    for key, row in rows.items():
        assert row["codes"] == data["codes"][key], key
        assert row["cls"] == data["truth"][key][1]
        assert row["shard"] == f"train-{_shard_of(key):06d}"


def _shard_of(key: str) -> int:
    return int(key[1:].split("-")[0])     # "s12-018000" -> 12


def tokenize_cmd(cluster, data, out, placement_timeout: float = 60.0, inputs: str = "pattern") -> list[str]:
    return [sys.executable, "-m", "pipelines", "tokenize", "--tokenizer", data["tok"], "--input", data[inputs],
            "--output", str(out), "--address", cluster.address, "--keep-fields", "cls", "--batch-size", "64",
            "--no-progress", "--placement-timeout", str(placement_timeout)]


def tokenize(cluster, data, out, placement_timeout: float = 60.0, inputs: str = "pattern"):
    """`vqtok tokenize` against the cluster in a process of its own (a driver in this process
    would inherit whatever Ray state earlier tests of the suite left in it, their token-auth mode
    included) -> (exit status, summary or None, stderr). 60 s: a test that loses every node
    fails in a minute."""
    proc = subprocess.run(tokenize_cmd(cluster, data, out, placement_timeout, inputs), capture_output=True,
                          text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=400)
    summary = json.loads(proc.stdout.split("summary: ")[-1]) if "summary: " in proc.stdout else None
    return proc.returncode, summary, proc.stderr


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def runs_under(pid: int, ancestor: int) -> bool:
    """Whether process `pid` descends from `ancestor` (a node's worker processes are its raylet's
    children)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def committed_by(out, node) -> list[dict]:
    """The manifests of shards that a worker on `node` committed."""
    ancestor = raylet_pid(node)
    found = []
    for path in glob.glob(f"{out}/_manifest/*.json"):
        try:
            m = json.load(open(path))
        except (OSError, ValueError):
            continue
        if runs_under(m["worker"]["pid"], ancestor):
            found.append(m)
    return found


def when_committed(out, n: int, action, by=None):
    """Run `action` in a thread as soon as `n` shards of `out` have committed (with `by`, a node:
    `n` shards committed by a worker on that node). The returned thread's `.finish()` stops the
    watch and returns when `action` started (its time), or raises what it raised; None when it
    never ran."""
    stop = threading.Event()
    result: dict = {}

    def count() -> int:
        return len(committed_by(out, by)) if by is not None else len(glob.glob(f"{out}/_manifest/*.json"))

    def watch():
        while count() < n and not stop.is_set():
            time.sleep(0.02)
        if stop.is_set():
            return
        try:
            result["at"] = time.monotonic()
            action()
        except BaseException as e:   # surfaced by finish()
            result["error"] = e

    def finish():
        stop.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result.get("at")

    thread = threading.Thread(target=watch, daemon=True)
    thread.finish = finish
    thread.start()
    return thread


def manifests(out) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(f"{out}/_manifest/*.json"))]


def test_node_killed_mid_job_its_shards_finish_on_the_survivor(cluster, nodes, data, tmp_path):
    nodes(1)
    doomed = nodes(1)
    out = tmp_path / "out"
    # killed once its worker has committed a shard: the worker is up and busy with the next one
    # (killed on the job's first commit, the doomed node's worker was sometimes not started yet
    # or between shards, and nothing needed a retry)
    killer = when_committed(out, 1, lambda: cluster.remove_node(doomed, allow_graceful=False), by=doomed)
    status, summary, stderr = tokenize(cluster, data, out)
    assert killer.finish() is not None            # the node was killed while the job ran
    assert status == 0, stderr[-3000:]
    assert summary["failed_shards"] == {} and summary["done"] == SHARDS
    assert summary["workers_lost"] >= 1 and summary["retries"] >= 1
    done = manifests(out)
    assert len(done) == SHARDS and any(m["attempt"] >= 2 for m in done)
    check_rows(out, data)


def test_node_added_mid_job_gets_a_worker(cluster, nodes, data, tmp_path):
    # the driver runs as the CLI in a subprocess: a node can be added from the main thread only
    nodes(1)
    out = tmp_path / "out"
    proc = subprocess.Popen(tokenize_cmd(cluster, data, out, placement_timeout=300.0, inputs="all"),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 180
        while not glob.glob(f"{out}/_manifest/*.json") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        joined = time.monotonic()
        nodes(1)
        print(f"node joined in {time.monotonic() - joined:.1f} s, "
              f"{len(glob.glob(f'{out}/_manifest/*.json'))} shards committed by then")
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.split("summary: ")[-1])
    assert summary["failed_shards"] == {} and summary["workers_lost"] == 0
    assert summary["workers_started"] == 2
    pids = {m["worker"]["pid"] for m in manifests(out)}
    assert len(pids) == 2, stdout               # the joining node's worker committed shards too
    check_rows(out, data, JOIN_SHARDS)


def test_no_node_left_stops_after_the_placement_timeout_and_a_rerun_resumes(cluster, nodes, data, tmp_path):
    only = nodes(1)
    out = tmp_path / "out"
    # 20 s: more than a worker's start-up on a loaded machine (the timer runs from the job's
    # start while no worker is ready yet)
    killer = when_committed(out, 1, lambda: cluster.remove_node(only, allow_graceful=False))
    status, _, stderr = tokenize(cluster, data, out, placement_timeout=20.0)
    stopped = time.monotonic()
    killed = killer.finish()
    assert killed is not None, "the job stopped before its first commit: " + stderr[-2000:]
    assert status == 1 and "Traceback" not in stderr
    assert 20 < stopped - killed < 20 + 30       # death detection (~4 s), a poll (2 s), load
    (msg,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert "for 20 s (--placement-timeout)" in msg and "rerun the same command" in msg
    finished = {m["shard"] for m in manifests(out)}
    assert 1 <= len(finished) < SHARDS
    assert f"{SHARDS - len(finished)} shard(s) not done" in msg
    nodes(1)                                    # capacity is back: the same command resumes
    # (a longer timeout here: what is tested is the resume, and a worker's start-up took over
    # 20 s once on a machine loaded by other work)
    status, summary, stderr = tokenize(cluster, data, out, placement_timeout=120.0)
    assert status == 0, stderr[-3000:]
    assert summary["failed_shards"] == {} and summary["skipped"] == len(finished)
    check_rows(out, data)
    assert glob.glob(f"{out}/_SUCCESS")
