"""Decode processes of a tokenize worker (pipelines/tokenize/decode_pool.py, shard_job.py):
several shards at once give the same files as one at a time inline; a decode process that
dies costs one attempt, not the worker; storage errors fail the attempt; children die with
their worker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.tokenize.shard_decoder import DecodeSpec
from pipelines.tokenize.decode_pool import DecodePool, DecodeProcessDied
from pipelines.tokenize.encoder import CodeEncoder
from pipelines.tokenize.shard_job import ShardTokenizer
from pipelines.tokenize.tokenizer_info import tokenizer_metadata

import tok_data as td


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    td.save_tokenizer(root / "tok")
    (root / "shards").mkdir()
    truth = td.write_fmnist_shards(root / "shards", n_shards=4, per_shard=150)
    # one odd shard: bad samples and a duplicate key, through the same processes
    samples, _, _ = td.odd_samples()
    td.write(root / "shards" / "odd.tar", td.tar_bytes(samples))
    return root, truth


def _job(root, out, processes, batch_size=64):
    enc = CodeEncoder(str(root / "tok"), threads=1)
    return ShardTokenizer(enc, tokenizer_metadata(str(root / "tok")), str(out), ["cls"],
                          batch_size=batch_size, decode_processes=processes)


def _shards(root):
    names = [f"train-{i:06d}" for i in range(4)] + ["odd"]
    return [(str(root / "shards" / f"{n}.tar"), n) for n in names]


def test_shards_at_once_in_processes_equal_inline_one_at_a_time(tmp_path, setup):
    root, truth = setup
    inline = _job(root, tmp_path / "inline", 0)
    for url, name in _shards(root):
        inline.run(url, name)
    pooled = _job(root, tmp_path / "pooled", 2, batch_size=32)    # other batches, same codes
    assert pooled.slots == 2
    manifests = {}
    try:
        threads = [threading.Thread(target=lambda u=u, n=n: manifests.__setitem__(n, pooled.run(u, n)))
                   for u, n in _shards(root)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pooled.close()
    assert len(manifests) == 5
    for _, name in _shards(root):
        a = pq.read_table(tmp_path / "inline" / f"{name}.parquet")
        b = pq.read_table(tmp_path / "pooled" / f"{name}.parquet")
        assert a.equals(b), name
        ea = pq.read_table(tmp_path / "inline" / "_errors" / f"{name}.parquet") if name == "odd" else None
        if ea is not None:
            assert ea.equals(pq.read_table(tmp_path / "pooled" / "_errors" / f"{name}.parquet"))
    keys = [k for i in range(4) for k in pq.read_table(tmp_path / "pooled" / f"train-{i:06d}.parquet")
            .column("key").to_pylist()]
    assert sorted(keys) == sorted(truth)                     # every sample once
    assert manifests["odd"]["worker"]["decode_processes"] == 2
    assert manifests["train-000000"]["counts"]["ok"] == 150


def test_a_decode_process_killed_mid_shard_fails_that_attempt_only(tmp_path, setup):
    root, _ = setup
    job = _job(root, tmp_path / "out", 1, batch_size=16)
    url, name = _shards(root)[0]
    real_encode = job.encoder.encode
    calls = []

    def encode_then_kill(images):
        calls.append(len(images))
        if len(calls) == 2:                                  # mid-shard
            victim = job.decoders.all[0].proc
            victim.kill()
            victim.wait()
        return real_encode(images)

    try:
        job.encoder.encode = encode_then_kill
        with pytest.raises(DecodeProcessDied, match="decode process ended"):
            job.run(url, name)
        assert not (tmp_path / "out" / f"{name}.parquet").exists()     # nothing committed
        job.encoder.encode = real_encode
        manifest = job.run(url, name)                          # the retry, on a new process
    finally:
        job.close()
    assert manifest["counts"]["ok"] == 150
    assert pq.read_table(tmp_path / "out" / f"{name}.parquet").num_rows == 150


def test_a_shard_abandoned_mid_way_does_not_leak_into_the_next(tmp_path, setup):
    root, _ = setup
    job = _job(root, tmp_path / "out", 1, batch_size=16)
    (url0, name0), (url1, name1) = _shards(root)[:2]
    real_encode = job.encoder.encode

    def failing(images):
        raise RuntimeError("accelerator fell over")

    try:
        job.encoder.encode = failing
        with pytest.raises(RuntimeError, match="fell over"):
            job.run(url0, name0)
        job.encoder.encode = real_encode
        manifest = job.run(url1, name1)
    finally:
        job.close()
    keys = pq.read_table(tmp_path / "out" / f"{name1}.parquet").column("key").to_pylist()
    assert manifest["counts"]["read"] == 150 and all(k.startswith("s1-") for k in keys)


def test_a_storage_error_fails_the_attempt_with_the_shard_named(tmp_path, setup):
    root, _ = setup
    (tmp_path / "adir.tar").mkdir()                     # opening it raises IsADirectoryError
    for processes in (0, 1):
        job = _job(root, tmp_path / f"out{processes}", processes)
        try:
            with pytest.raises(OSError, match="adir.tar"):
                job.run(str(tmp_path / "adir.tar"), "adir")
        finally:
            job.close()


def test_decode_processes_die_with_their_worker(tmp_path):
    script = (
        "import sys, time\n"
        "from pipelines.tokenize.shard_decoder import DecodeSpec\n"
        "from pipelines.tokenize.decode_pool import DecodePool\n"
        "pool = DecodePool(DecodeSpec(1, 28, (), 8), 2)\n"
        "print(' '.join(str(p.proc.pid) for p in pool.all), flush=True)\n"
        "time.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        pids = [int(p) for p in worker.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        worker.send_signal(signal.SIGKILL)                 # no chance to clean up
        worker.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        worker.kill()


def test_pool_buffers_are_shared_not_copied(setup):
    root, _ = setup
    pool = DecodePool(DecodeSpec(1, 28, ("cls",), 64), 1)
    try:
        with pool.acquire() as proc:
            batches = proc.batches(str(root / "shards" / "train-000000.tar"))
            _, images, batch = next(batches)
            assert batch.count == 64 and images.shape == (64, 1, 28, 28)
            assert not images.flags.owndata                    # a view of the shared buffer
            first = np.array(images)
            rest = sum(b.count for _, _, b in batches)
        assert rest == 150 - 64 and first.std() > 0
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:                      # a zombie is not alive
        return f.read().split()[2] != "Z"


def test_a_shard_whose_reading_stalls_fails_its_attempt_at_the_deadline(tmp_path, setup):
    root, _ = setup
    fifo = tmp_path / "stall.tar"
    os.mkfifo(fifo)                  # nobody writes it: the decode process's open never returns
    job = ShardTokenizer(CodeEncoder(str(root / "tok"), threads=1), tokenizer_metadata(str(root / "tok")),
                         str(tmp_path / "out"), ["cls"], batch_size=64, decode_processes=1, shard_timeout=1.0)
    stuck = job.decoders.all[0].proc
    outcome = {}

    def attempt():
        t0 = time.monotonic()
        try:
            job.run(str(fifo), "stall")
        except Exception as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - t0

    try:
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout=30)
        if thread.is_alive():        # never in a passing run: unblock the reader so the test ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(timeout=30)
            pytest.fail("the stalled shard hung its attempt past the deadline")
        assert isinstance(outcome["error"], TimeoutError), outcome
        assert f"{fifo}: not read and decoded within --shard-timeout 1 s" in str(outcome["error"])
        assert 1.0 <= outcome["seconds"] < 10.0
        assert stuck.poll() is not None                      # killed, and replaced by the pool
        assert not (tmp_path / "out" / "stall.parquet").exists()
        url, name = _shards(root)[0]
        assert job.run(url, name)["counts"]["ok"] == 150      # the next shard, on the new process
        assert job.decoders.all[0].proc is not stuck
    finally:
        job.close()
