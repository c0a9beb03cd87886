"""`vqtok tokenize` / `vqtok submit` end to end on real Ray: the embedded local cluster, a
`ray start --head` with token auth on 127.0.0.1 (--address and the job API), S3 through moto,
corrupt inputs, a worker and the driver killed mid-job. Every test checks exact row sets."""
from __future__ import annotations

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import tok_data as td
from pipelines.output_format import read_metadata


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir):
    return td.shard_set(tmp_path_factory.mktemp("shards"), tok_dir, 3, 150)


expected_codes = td.expected_codes   # imported from here by other test modules


def read_rows(out: str, filesystem=None) -> dict[str, dict]:
    """key -> row, read the way downstream users do (a dataset over the directory); asserts no
    key appears twice."""
    table = ds.dataset(out, format="parquet", filesystem=filesystem).to_table()
    rows = table.to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    return {r["key"]: r for r in rows}


def check_rows(rows: dict, shards: dict, keys=None) -> None:
    keys = set(shards["truth"]) if keys is None else keys
    assert set(rows) == keys
    for key in keys:
        assert rows[key]["codes"] == shards["codes"][key], key
        assert rows[key]["cls"] == shards["truth"][key][1]
        assert rows[key]["shard"] == f"train-{int(key[1]):06d}"


def summary_of(proc) -> dict:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("summary: ")][-1]
    return json.loads(line[len("summary: "):])


def head_env(ray_head, **extra) -> dict:
    return {**ray_head["env"], **extra}


def no_token_leak(proc, ray_head) -> None:
    assert ray_head["token"] not in proc.stdout and ray_head["token"] not in proc.stderr


def test_local_embedded_ray_run_then_rerun_skips(tmp_path, tok_dir, shards):
    out = str(tmp_path / "out")
    env = {"HOME": str(tmp_path / "home")}          # Ray's default token file lands here
    args = ["tokenize", "--tokenizer", tok_dir, "--input", shards["pattern"], "--output", out,
            "--keep-fields", "cls", "--workers", "2"]
    proc = td.vqtok(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_rows(read_rows(out), shards)
    summary = summary_of(proc)
    assert summary["samples"] == {"read": 450, "ok": 450, "failed": 0, "failed_by_reason": {}}
    assert summary["done"] == 3 and summary["skipped"] == 0 and summary["error_rate"] == 0.0
    assert os.path.exists(f"{out}/_SUCCESS") and not os.path.exists(f"{out}/_errors")
    assert not os.path.exists(f"{out}/_lease.json")           # released at the end
    meta = read_metadata(f"{out}/train-000000.parquet")
    assert meta.grid == (7, 7) and meta.codebook_size == 64 and meta.channels == 1 and meta.resolution == 28
    assert str(pq.read_schema(f"{out}/train-000000.parquet").field("codes").type) == "list<element: int16>"
    manifests = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/_manifest/*.json"))]
    assert [m["counts"]["ok"] for m in manifests] == [150, 150, 150]
    assert all(m["tokenizer_sha256"] == meta.tokenizer_sha256 for m in manifests)
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/*.parquet")}
    again = td.vqtok(args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary_of(again)["skipped"] == 3 and summary_of(again)["samples"]["ok"] == 450
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/*.parquet")} == mtimes


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory, tok_dir):
    """Enough work that both workers of a two-worker job get shards: a worker ready first would
    finish all of 3 small shards before the other one is up (seen in CI)."""
    return td.shard_set(tmp_path_factory.mktemp("eight"), tok_dir, 8, 750)


def test_address_multi_worker_codes_equal_single_worker(tmp_path, tok_dir, eight_shards, ray_head):
    shards = eight_shards
    outs = {}
    for name, extra in {"one": ["--workers", "1", "--cpus-per-worker", "2", "--batch-size", "7"],
                        "two": ["--workers", "2", "--cpus-per-worker", "1", "--batch-size", "300"]}.items():
        out = str(tmp_path / name)
        proc = td.vqtok(["tokenize", "--tokenizer", tok_dir, "--input", shards["pattern"], "--output", out,
                         "--keep-fields", "cls", "--address", ray_head["address"], *extra],
                        env=head_env(ray_head))
        assert proc.returncode == 0, proc.stderr[-3000:]
        no_token_leak(proc, ray_head)
        outs[name] = read_rows(out)
        check_rows(outs[name], shards)
        per_pid = collections.Counter(json.load(open(p))["worker"]["pid"] for p in glob.glob(f"{out}/_manifest/*.json"))
        print(f"{name}: shards per worker {sorted(per_pid.values())}")
        assert len(per_pid) == (1 if name == "one" else 2)
    assert {k: r["codes"] for k, r in outs["one"].items()} == {k: r["codes"] for k, r in outs["two"].items()}


def test_s3_input_and_output_through_moto(tok_dir, shards, ray_head, s3_env):
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env["endpoint"]})
    fs.mkdir("vqtok-test")
    for path in sorted(glob.glob(f"{shards['dir']}/*.tar")):
        fs.put_file(path, f"vqtok-test/in/{os.path.basename(path)}")
    proc = td.vqtok(["tokenize", "--tokenizer", tok_dir, "--input", "s3://vqtok-test/in/train-{000000..000002}.tar",
                     "--output", "s3://vqtok-test/out", "--keep-fields", "cls", "--address", ray_head["address"]],
                    env=head_env(ray_head, **s3_env["env"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("vqtok-test/out"))
    assert names == ["_SUCCESS", "_manifest", "_vqtok.json", "train-000000.parquet", "train-000001.parquet",
                     "train-000002.parquet"]
    check_rows(read_rows("vqtok-test/out", filesystem=fs), shards)
    assert summary_of(proc)["samples"]["ok"] == 450


def test_corrupt_inputs_become_error_rows_and_exit_status(tmp_path, tok_dir, ray_head):
    d = tmp_path / "in"
    d.mkdir()
    samples, odd_ok, odd_reasons = td.odd_samples()
    td.write(d / "odd.tar", td.tar_bytes(samples))
    broken = td.broken_shards(d)
    out = str(tmp_path / "out")
    args = ["tokenize", "--tokenizer", tok_dir, "--input", f"{d}/*.tar", "--output", out, "--keep-fields", "cls",
            "--address", ray_head["address"], "--workers", "2"]
    proc = td.vqtok(args, env=head_env(ray_head))
    assert proc.returncode == 1 and "exceeds --max-error-rate" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    expected = {**broken, "odd": {"ok": odd_ok, "errors": {**odd_reasons, "good-000000": "duplicate_key"},
                                   "shard_error": False}}
    for shard, exp in expected.items():
        table = pq.read_table(f"{out}/{shard}.parquet")          # every shard has a data file
        assert set(table.column("key").to_pylist()) == exp["ok"], shard
        assert table.num_rows == len(exp["ok"])
        manifest = json.load(open(f"{out}/_manifest/{shard}.json"))
        assert manifest["counts"]["ok"] == len(exp["ok"])
        assert manifest["counts"]["failed"] == len(exp["errors"])
        assert manifest["counts"]["shard_errors"] == int(exp["shard_error"])
        err_file = f"{out}/_errors/{shard}.parquet"
        if not exp["errors"] and not exp["shard_error"]:
            assert not os.path.exists(err_file)
            continue
        errors = pq.read_table(err_file).to_pylist()
        assert {e["key"] for e in errors if e["key"] is not None} == set(exp["errors"])
        assert sum(e["key"] is None for e in errors) == int(exp["shard_error"])
        assert all(e["shard"] == shard and e["error"] for e in errors)
    odd_manifest = json.load(open(f"{out}/_manifest/odd.json"))
    assert odd_manifest["counts"]["failed_by_reason"] == {"bad_kept_field": 1, "duplicate_key": 1, "empty_image": 1,
                                                          "no_image": 2, "undecodable_image": 2}
    assert os.path.exists(f"{out}/_SUCCESS")   # every shard was processed; the data is complete
    rows = read_rows(out)                      # readers see only code rows
    assert len(rows) == sum(len(e["ok"]) for e in expected.values())
    # the same command with a tolerant threshold: nothing is redone, the exit status is 0
    tolerant = td.vqtok(args + ["--max-error-rate", "1"], env=head_env(ray_head))
    assert tolerant.returncode == 0 and summary_of(tolerant)["skipped"] == 7


def _many_shards(tmp_path, tok_dir, n=8, per=1500):
    # enough work per shard (0.3-0.5 s with the tiny tokenizer, measured) that the job is still
    # running when a test kills something after the first manifest, even on a loaded machine
    d = tmp_path / "many"
    d.mkdir()
    truth = td.write_fmnist_shards(d, n, per)
    return {"dir": str(d), "pattern": f"{d}/train-*.tar", "truth": truth, "codes": expected_codes(tok_dir, truth)}


def _wait_for_manifests(out: str, n: int, proc, timeout=120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(glob.glob(f"{out}/_manifest/*.json"))
        if len(found) >= n:
            return found
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("no manifest appeared")


def _popen(args, env):
    return subprocess.Popen([sys.executable, "-m", "pipelines", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_worker_killed_mid_job_shard_retried_and_committed_once(tmp_path, tok_dir, ray_head):
    data = _many_shards(tmp_path, tok_dir)
    out = str(tmp_path / "out")
    proc = _popen(["tokenize", "--tokenizer", tok_dir, "--input", data["pattern"], "--output", out,
                   "--keep-fields", "cls", "--address", ray_head["address"], "--workers", "1",
                   "--batch-size", "64", "--no-progress"], head_env(ray_head))
    first = _wait_for_manifests(out, 1, proc)
    victim = json.load(open(first[0]))["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)           # a Ray worker of our own head, mid-job
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.split("summary: ")[-1])
    assert summary["replaced_workers"] == 1 and summary["retries"] >= 1
    manifests = [json.load(open(p)) for p in glob.glob(f"{out}/_manifest/*.json")]
    assert len(manifests) == 8
    assert any(m["attempt"] >= 2 and m["worker"]["pid"] != victim for m in manifests)
    check_rows(read_rows(out), data)
    assert not glob.glob(f"{out}/_tmp/*")


def test_driver_killed_then_same_command_finishes_without_redoing(tmp_path, tok_dir, ray_head):
    data = _many_shards(tmp_path, tok_dir)
    out = str(tmp_path / "out")
    args = ["tokenize", "--tokenizer", tok_dir, "--input", data["pattern"], "--output", out, "--keep-fields", "cls",
            "--address", ray_head["address"], "--workers", "1", "--batch-size", "64", "--no-progress"]
    proc = _popen(args, head_env(ray_head))
    _wait_for_manifests(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    time.sleep(3)                              # the job's actor dies with its owner
    finished = {p.rsplit("/", 1)[-1][:-5] for p in glob.glob(f"{out}/_manifest/*.json")}
    mtimes = {s: os.stat(f"{out}/{s}.parquet").st_mtime_ns for s in finished}
    assert 2 <= len(finished) < 8
    again = td.vqtok(args, env=head_env(ray_head))
    assert again.returncode == 0, again.stderr[-3000:]
    # the killed driver's lease is left behind; its process is gone, so it is taken over at once
    assert f"its process {proc.pid} on this machine is no longer running" in again.stderr
    assert summary_of(again)["skipped"] == len(finished)
    assert {s: os.stat(f"{out}/{s}.parquet").st_mtime_ns for s in finished} == mtimes
    check_rows(read_rows(out), data)
    assert os.path.exists(f"{out}/_SUCCESS") and not glob.glob(f"{out}/_tmp/*")


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path, tok_dir, ray_head):
    data = _many_shards(tmp_path, tok_dir)
    out = str(tmp_path / "out")
    args = ["tokenize", "--tokenizer", tok_dir, "--input", data["pattern"], "--output", out, "--keep-fields", "cls",
            "--address", ray_head["address"], "--workers", "1", "--batch-size", "64", "--no-progress"]
    first = _popen(args, head_env(ray_head))
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{out}/_lease.json") and time.monotonic() < deadline:   # before Ray
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.05)
    lease = json.load(open(f"{out}/_lease.json"))
    second = td.vqtok(args, env=head_env(ray_head))
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert (f"is being written by another tokenize job (job {lease['job_id']} on host {lease['host']}, "
            f"pid {first.pid}") in second.stderr
    assert json.loads(stdout.split("summary: ")[-1])["done"] == 8 and not os.path.exists(f"{out}/_lease.json")
    check_rows(read_rows(out), data)


def test_a_stalled_shard_fails_after_its_attempts_and_the_others_finish(tmp_path, tok_dir, shards, ray_head):
    d = tmp_path / "in"
    d.mkdir()
    os.symlink(f"{shards['dir']}/train-000000.tar", d / "train-000000.tar")
    os.mkfifo(d / "stall.tar")          # nobody writes it: every read of it stalls
    out = str(tmp_path / "out")
    t0 = time.monotonic()
    proc = td.vqtok(["tokenize", "--tokenizer", tok_dir, "--input", f"{d}/*.tar", "--output", out, "--keep-fields",
                     "cls", "--address", ray_head["address"], "--workers", "1", "--cpus-per-worker", "2",
                     "--shard-timeout", "2", "--max-attempts", "2", "--no-progress"], env=head_env(ray_head))
    print(f"stalled-shard job: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "1 shard(s) failed; rerun the same command" in proc.stderr
    summary = summary_of(proc)
    assert summary["done"] == 1 and summary["retries"] == 1
    assert summary["failed_shards"] == {"stall": f"gave up after 2 attempts: TimeoutError: {d}/stall.tar: not read "
                                                 "and decoded within --shard-timeout 2 s; this attempt was stopped"}
    assert len(read_rows(out)) == 150 and not os.path.exists(f"{out}/_SUCCESS")


def test_output_of_another_tokenizer_is_refused_unless_overwrite(tmp_path, tok_dir, shards, ray_head):
    other = tmp_path / "other"
    td.save_tokenizer(other, seed=3)
    out = str(tmp_path / "out")
    base = ["--input", f"{shards['dir']}/train-000000.tar", "--output", out, "--address", ray_head["address"]]
    first = td.vqtok(["tokenize", "--tokenizer", tok_dir, *base], env=head_env(ray_head))
    assert first.returncode == 0, first.stderr[-3000:]
    refused = td.vqtok(["tokenize", "--tokenizer", str(other), *base], env=head_env(ray_head))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "different tokenizer" in refused.stderr and "--overwrite" in refused.stderr
    replaced = td.vqtok(["tokenize", "--tokenizer", str(other), *base, "--overwrite"], env=head_env(ray_head))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    from tokenizer import VQVAE
    assert read_metadata(f"{out}/train-000000.parquet").tokenizer_sha256 == VQVAE.from_pretrained(str(other)).weights_sha256()
    assert len(read_rows(out)) == 150


def test_submit_wait_runs_the_job_on_the_cluster(tmp_path, tok_dir, shards, ray_head):
    out = str(tmp_path / "out")
    proc = td.vqtok(["submit", "--address", ray_head["dashboard"], "--wait", "--", "tokenize", "--tokenizer", tok_dir,
                     "--input", shards["pattern"], "--output", out, "--keep-fields", "cls", "--no-progress"],
                    env=head_env(ray_head), timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.splitlines()[0].startswith("raysubmit_")
    assert "tokenized 3/3 shards" in proc.stdout and "SUCCEEDED" in proc.stderr
    no_token_leak(proc, ray_head)
    check_rows(read_rows(out), shards)
    failing = td.vqtok(["submit", "--address", ray_head["dashboard"], "--wait", "--", "tokenize", "--tokenizer",
                        tok_dir, "--input", str(tmp_path / "nothing-*.tar"), "--output", out],
                       env=head_env(ray_head), timeout=300)
    assert failing.returncode == 1 and "no shard matches" in failing.stdout


def test_submit_without_or_with_a_wrong_token_is_a_clear_error(tmp_path, ray_head):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)                 # no ~/.ray/auth_token either
    args = [sys.executable, "-m", "pipelines", "submit", "--address", ray_head["dashboard"], "--", "tokenize"]
    missing = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "uses token authentication and no token was found" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "~/.ray/auth_token" in missing.stderr
    wrong = "0" * 32
    bad = subprocess.run(args, env={**env, "RAY_AUTH_TOKEN": wrong}, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "refused the token found on this machine" in bad.stderr
    assert wrong not in bad.stdout + bad.stderr
