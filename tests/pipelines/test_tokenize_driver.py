"""The tokenize driver (pipelines/tokenize/driver.py): no torch in the driver; the output lease
around the job (taken before any cleanup, released however the job ends)."""

from __future__ import annotations

import contextlib
import os
import uuid

import fsspec
import pytest

import tok_data as td
from pipelines.errors import UserError
from pipelines.tokenize import TokenizeConfig, driver, lease as lease_mod
from pipelines.tokenize.scheduler import Outcome


def test_tokenize_driver_does_not_import_torch():
    # the driver only reads configs and schedules; torch's import (~1.5 s) belongs to the workers
    import subprocess
    import sys
    code = ("import sys, pipelines.cli, pipelines.cli.tokenize, pipelines.tokenize.driver, "
            "pipelines.tokenize.worker; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False"


# -- the output lease (no Ray: the driver's own steps before and after it) -------------------------


@pytest.fixture
def job(tmp_path, tok_dir, monkeypatch):
    """A one-shard job's config maker (output URL -> TokenizeConfig); Ray may not start."""
    images, labels = td.fashion_mnist(2)
    shard = td.write(tmp_path / "a.tar", td.tar_bytes(td.fmnist_samples(images, labels, "a-")))
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.0)

    def no_ray(address):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "ray_session", no_ray)
    return lambda output: TokenizeConfig(tokenizer=tok_dir, inputs=[shard], output=output, progress=False)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_second_job_is_refused_before_it_deletes_anything(tmp_path, job, where):
    output = str(tmp_path / "out") if where == "local" else f"memory://drv-{uuid.uuid4().hex[:8]}/out"
    fs, root = fsspec.core.url_to_fs(output)
    first = lease_mod.OutputLease(output, settle_s=0.0)
    first.acquire()
    try:
        fs.makedirs(f"{root}/_tmp", exist_ok=True)
        fs.pipe_file(f"{root}/_tmp/.a.parquet.tmp-1-2", b"the first job's file in flight")
        with pytest.raises(UserError, match=f"is being written by another tokenize job \\(job {first.job_id} "):
            driver.run_tokenize(job(output))
        assert fs.cat_file(f"{root}/_tmp/.a.parquet.tmp-1-2") == b"the first job's file in flight"
        with pytest.raises(UserError, match="being written by another"):   # --overwrite deletes nothing either
            driver.run_tokenize(TokenizeConfig(**{**vars(job(output)), "overwrite": True}))
        assert fs.exists(f"{root}/_tmp/.a.parquet.tmp-1-2")
    finally:
        first.release()


def _ends(how):
    def fake_run_on_ray(ray, cfg, meta, todo, total, skipped, ray_t0, lease):
        held = lease_mod.read_lease(lease_mod.lease_url(cfg.output))
        assert held["job_id"] == lease.job_id and held["job"]["shards"] == 1
        if how == "fails":
            raise RuntimeError("a worker fell over")
        if how == "ctrl-c":
            raise KeyboardInterrupt
        return Outcome(), 0.0
    return fake_run_on_ray


@pytest.mark.parametrize("how", ["succeeds", "fails", "ctrl-c"])
def test_the_lease_is_released_when_the_job_ends(tmp_path, job, monkeypatch, how):
    monkeypatch.setattr(driver, "ray_session", lambda address: contextlib.nullcontext("ray"))
    monkeypatch.setattr(driver, "_run_on_ray", _ends(how))
    output = str(tmp_path / "out")
    if how == "succeeds":
        driver.run_tokenize(job(output))
        assert (tmp_path / "out" / "_SUCCESS").exists()
    else:
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            driver.run_tokenize(job(output))
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_a_job_whose_lease_was_taken_over_writes_no_success(tmp_path, job, monkeypatch):
    def taken_over(ray, cfg, meta, todo, total, skipped, ray_t0, lease):
        lease_mod.OutputLease(cfg.output, settle_s=0.0, clock=lambda: 1e12).acquire()   # sees it as stale
        return Outcome(), 0.0

    monkeypatch.setattr(driver, "ray_session", lambda address: contextlib.nullcontext("ray"))
    monkeypatch.setattr(driver, "_run_on_ray", taken_over)
    with pytest.raises(lease_mod.LeaseLost, match="lost the output's lease"):
        driver.run_tokenize(job(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert (tmp_path / "out" / "_lease.json").exists()           # the new holder's, left alone
