"""The output lease (pipelines/tokenize/lease.py): one job writes an OUTPUT at a time, on local
paths and object stores (memory://); stale and orphaned leases are taken over; a job that lost
its lease commits nothing more."""
from __future__ import annotations

import json
import subprocess
import time
import uuid

import fsspec
import pytest

from pipelines.errors import UserError
from pipelines.tokenize.lease import LeaseLost, OutputLease, lease_url, read_lease
from pipelines.tokenize.commit import ShardCommitter


@pytest.fixture(params=["local", "memory"])
def output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    url = f"memory://lease-{uuid.uuid4().hex[:8]}/out"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def lease(output, **kw) -> OutputLease:
    return OutputLease(output, settle_s=0.0, **kw)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def test_a_second_job_is_refused_naming_the_holder_until_the_first_releases(output):
    first = lease(output)
    first.acquire()
    held = read_lease(lease_url(output))
    assert held["job_id"] == first.job_id and held["pid"] == first.record["pid"] and held["heartbeat"] > 0
    second = lease(output)
    with pytest.raises(UserError) as e:
        second.acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"--output {output} is being written by another tokenize job" in msg
    assert f"job {first.job_id} on host {first.record['host']}, pid {first.record['pid']}" in msg
    assert "last heartbeat 0 s ago" in msg and "use another --output" in msg
    assert read_lease(lease_url(output))["job_id"] == first.job_id      # the refused job wrote nothing
    first.release()
    assert not exists(lease_url(output))
    second.acquire()
    assert read_lease(lease_url(output))["job_id"] == second.job_id
    second.release()
    assert not exists(lease_url(output))


def test_a_stale_lease_is_taken_over_with_a_warning_and_its_holder_stops(output, capsys):
    first = lease(output, heartbeat_s=0.05)
    first.acquire()
    later = lease(output, clock=lambda: time.time() + 120)     # first's heartbeat looks 120 s old
    later.acquire()
    err = capsys.readouterr().err
    assert f"taking over the lease of job {first.job_id}" in err and "no heartbeat for 120 s" in err
    with pytest.raises(LeaseLost, match=f"lost the output's lease \\(now job {later.job_id} on host"):
        first.verify()
    # the heartbeat thread notices too
    first.lost = None
    first.start_heartbeat()
    deadline = time.monotonic() + 10
    while first.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseLost, match=later.job_id):
        first.raise_if_lost()
    first.release()                                  # not its lease any more: left alone
    assert read_lease(lease_url(output))["job_id"] == later.job_id
    later.release()
    assert not exists(lease_url(output))


def test_the_heartbeat_keeps_a_lease_fresh(output):
    holder = lease(output, heartbeat_s=0.05, stale_s=1.0)
    holder.acquire()
    holder.start_heartbeat()
    try:
        beats = set()
        deadline = time.monotonic() + 10
        while len(beats) < 3 and time.monotonic() < deadline:
            beats.add(read_lease(lease_url(output))["heartbeat"])
            time.sleep(0.02)
        assert len(beats) >= 3
        time.sleep(1.2)                              # past a stale time: still fresh, not taken over
        with pytest.raises(UserError, match="being written by another tokenize job"):
            lease(output, stale_s=1.0).acquire()
    finally:
        holder.release()


def test_a_lease_whose_process_on_this_machine_is_gone_is_taken_over_at_once(tmp_path, capsys):
    output = str(tmp_path / "out")
    gone = subprocess.Popen(["true"])
    gone.wait()
    first = lease(output)
    first.acquire()
    url = lease_url(output)
    record = read_lease(url)
    record["pid"] = gone.pid                         # as if a killed job (SIGKILL, OOM) had left it
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(record))
    second = lease(output)
    second.acquire()
    assert f"its process {gone.pid} on this machine is no longer running" in capsys.readouterr().err
    assert read_lease(url)["job_id"] == second.job_id
    second.release()


def test_a_worker_of_a_job_that_lost_its_lease_commits_nothing(tmp_path):
    output = str(tmp_path / "out")
    ShardCommitter(output).commit_manifest("s", {"old": True})   # a shard committed earlier
    holder = lease(output)
    holder.acquire()
    try:
        mine = ShardCommitter(output, lease_id=holder.job_id)
        mine.commit_data("a", b"data", f"{output}/a.parquet", [])
        assert (tmp_path / "out" / "a.parquet").read_bytes() == b"data"
        stale = ShardCommitter(output, lease_id="0123456789abcdef")   # the job that lost it
        with pytest.raises(LeaseLost, match=f"now job {holder.job_id}.*shard s was not committed"):
            stale.commit_data("s", b"other", f"{output}/s.parquet", [("s", "k", "bad")])
    finally:
        holder.release()
    assert not (tmp_path / "out" / "s.parquet").exists() and not (tmp_path / "out" / "_errors").exists()
    assert json.loads((tmp_path / "out" / "_manifest" / "s.json").read_text()) == {"old": True}
    with pytest.raises(LeaseLost, match="no job \\(the lease was removed\\)"):
        ShardCommitter(output, lease_id=holder.job_id).commit_data("a", b"late", f"{output}/a.parquet", [])
