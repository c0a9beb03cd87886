"""DDP with gloo on CPU: replicas stay bitwise identical, 2 ranks x b == 1 rank x 2b, two
launchers form one two-node job, a failing rank stops the job with one error line, and SIGTERM
stops both ranks after one step with a checkpoint that --resume continues from."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import torch
import yaml
from PIL import Image

from conftest import free_port
from pipelines.prepare import ShardWriter

WORKER = textwrap.dedent('''
    import sys
    import torch
    from pipelines import distributed as D
    from pipelines.parallelize import parallelize
    from tokenizer import VQVAE, VQVAEConfig

    mode, out, steps, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), 8
    info = D.setup("cpu", timeout_s=60)
    same = mode == "match"            # k-means seeding and restarts read rank 0's batch
    cfg = VQVAEConfig(hidden=16, res_hidden=8, num_res_blocks=1, code_dim=8,
                      quantizer=dict(codebook_size=32, kmeans_init=not same,
                                     dead_code_threshold=0.0 if same else 3.0))
    torch.manual_seed(0)
    model = VQVAE(cfg, collectives=D.quantizer_collectives())
    assert isinstance(model.quantizer.collectives, D.ProcessGroupCollectives) == (info.world_size > 1)
    ddp = parallelize(model, info)
    if mode == "reseeded":            # per-rank streams for the quantiser's choices, as vqtok train
        torch.manual_seed(1000 + info.rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(123)
    restarted = 0
    for step in range(steps):
        x = torch.rand(2 * b, 1, 28, 28, generator=gen)          # the global batch
        local = x.chunk(info.world_size)[info.rank]
        _, _, losses = ddp(local)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        restarted += int(model.quantizer.metrics.get("restarted", torch.tensor(0.0)))
    torch.save({"state": model.state_dict(), "restarted": restarted},
               f"{out}/{mode}-w{info.world_size}-r{info.rank}.pt")
    D.teardown()
    D.exit_rank(0)
''')


def torchrun(script, args, nproc=2, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_codebooks_stay_bitwise_equal_across_ranks_with_kmeans_and_restarts(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, ["equal", str(tmp_path), "6"])   # ranks seeded alike
    r0 = torch.load(tmp_path / "equal-w2-r0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "equal-w2-r1.pt", weights_only=True)
    assert r0["restarted"] > 0                      # dead-code restarts did happen
    assert int(r0["state"]["quantizer.initialized"]) == 1
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    # and training moved the codebook away from its random init
    assert not torch.equal(r0["state"]["quantizer.codebook"], r0["state"]["quantizer.ema_sum"] * 0)


def test_a_run_with_per_rank_seeds_is_reproducible(tmp_path):
    """k-means seeding and dead-code restarts take rank 0's rows, drawn from rank 0's stream; with
    per-rank seeds the whole run is the same every time."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torchrun(script, ["reseeded", str(tmp_path / name), "6"])
        runs.append([torch.load(tmp_path / name / f"reseeded-w2-r{r}.pt", weights_only=True) for r in (0, 1)])
    assert runs[0][0]["restarted"] > 0
    for name, tensor in runs[0][0]["state"].items():
        assert torch.equal(tensor, runs[1][0]["state"][name]), name     # run a == run b
        assert torch.equal(tensor, runs[0][1]["state"][name]), name     # rank 0 == rank 1


def test_one_step_on_two_ranks_matches_one_rank_with_the_double_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, ["match", str(tmp_path), "1"])
    single = subprocess.run([sys.executable, str(script), "match", str(tmp_path), "1"],
                            capture_output=True, text=True, timeout=60)
    assert single.returncode == 0, single.stderr
    two = torch.load(tmp_path / "match-w2-r0.pt", weights_only=True)["state"]
    one = torch.load(tmp_path / "match-w1-r0.pt", weights_only=True)["state"]
    for name in one:
        torch.testing.assert_close(two[name].float(), one[name].float(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def shards(out, n=64, per=16, rgb_shard=None):
    rng = np.random.default_rng(0)
    with ShardWriter(str(out), "train-%06d.tar", per) as w:
        for i in range(n):
            shape = (28, 28, 3) if rgb_shard is not None and i // per == rgb_shard else (28, 28)
            w.write({"__key__": f"s{i:06d}", "png": png(rng.integers(0, 256, shape, dtype=np.uint8))})
    return str(out / "train-*.tar")


TINY = ["model.hidden=16", "model.res_hidden=8", "model.code_dim=8", "model.num_res_blocks=1",
        "model.quantizer.codebook_size=32", "data.num_workers=0", "data.shuffle_buffer=16",
        "train.progress=false"]


def vqtok_train(train, out, *extra):
    sets = [a for s in TINY for a in ("--set", s)]
    return [sys.executable, "-m", "pipelines", "train", "--train-data", train, "--out", str(out),
            "--batch-size", "8", *sets, *extra]


def test_two_launchers_form_one_two_node_job(tmp_path):
    train = shards(tmp_path / "d")
    port = str(free_port())
    procs = [subprocess.Popen(vqtok_train(train, tmp_path / "run", "--max-steps", "5", "--nnodes", "2",
                                          "--node-rank", str(r), "--nproc-per-node", "1",
                                          "--master-addr", "127.0.0.1", "--master-port", port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000005.pt", weights_only=True)
    assert len(state["ranks"]) == 2               # one job of world size 2
    assert state["ranks"][0]["codebook_sha256"] == state["ranks"][1]["codebook_sha256"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert "tokenizer exported" in outs[0][0]


def test_a_failing_rank_stops_the_job_with_one_error_line(tmp_path):
    # shard 1 holds RGB images: whichever rank reads it fails; its peer must not hang
    train = shards(tmp_path / "d", n=32, per=16, rgb_shard=1)
    t0 = time.time()
    r = subprocess.run(vqtok_train(train, tmp_path / "run", "--max-steps", "50", "--nproc-per-node", "2",
                                   "--set", "train.timeout_s=300"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert time.time() - t0 < 100                 # fail-fast, not the 300 s collective timeout
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "3 channel(s)" in errors[0] and "model.in_channels = 1" in errors[0]
    assert "Traceback" not in r.stderr


def wait_for_step(out, step: int, proc, timeout: float = 120) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(f'"step": {step},' in line for line in open(metrics)):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached; exit {proc.poll()}")


def rank_processes(launcher_pid: int) -> list:
    """The ranks: the torchrun agent's children (their DataLoader workers are grandchildren)."""
    import psutil
    (agent,) = psutil.Process(launcher_pid).children()
    return [p for p in agent.children() if "pipelines.train" in " ".join(p.cmdline())]


def stop_and_check(tmp_path, send_signal) -> int:
    """Start a 2-rank run (a DataLoader worker each), signal it, check the stop; -> the step."""
    import psutil
    train = shards(tmp_path / "d")
    out = tmp_path / "run"
    cmd = vqtok_train(train, out, "--max-steps", "100000", "--nproc-per-node", "2",
                      "--set", "data.num_workers=1", "--set", "train.log_every=2",
                      "--set", "train.checkpoint_every=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_step(out, 6, proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(rank_processes(proc.pid)) == 2
        send_signal(proc)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert os.listdir(out / "checkpoints") == [f"step-{step:08d}.pt"]
    state = torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)
    assert state["step"] == step >= 6 and len(state["ranks"]) == 2
    # the launcher recorded the resolved config once; both ranks trained with it
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert state["config"] == recorded and recorded["data"]["num_workers"] == 1   # the default is 2
    assert [r["num_workers"] for r in state["ranks"]] == [1, 1]
    assert not (out / "final").exists()
    time.sleep(0.5)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # and the run continues from there
    done = subprocess.run(cmd[:cmd.index("100000")] + [str(step + 4)] + cmd[cmd.index("100000") + 1:]
                          + ["--resume"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"train"' in x]
    assert steps[-1] == step + 4 and (out / "final" / "model.safetensors").exists()
    return step


def test_sigterm_to_the_launcher_group_checkpoints_then_resume_finishes(tmp_path):
    # what `kill -TERM -PGID`, a scheduler or Ctrl-C's group signal does to `vqtok train`
    stop_and_check(tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGTERM))


def test_sigterm_to_one_rank_stops_both_ranks_after_the_same_step(tmp_path):
    stop_and_check(tmp_path, lambda proc: rank_processes(proc.pid)[1].send_signal(signal.SIGTERM))


def test_a_users_own_torchrun_resolves_on_rank_0_and_records_the_config(tmp_path):
    """`torchrun -m pipelines.train ...` (the SLURM recipe): rank 0 resolves the options once and
    records RUN/config.yaml, the other rank trains with that text; a refused resume is one line."""
    train = shards(tmp_path / "d", n=32)
    out = tmp_path / "run"
    sets = [a for s in TINY + ["data.num_workers=1"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "pipelines.train", "--train-data", train, "--out", str(out), "--batch-size", "8", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--max-steps", "2"], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    state = torch.load(out / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert state["config"] == recorded and recorded["train"]["max_steps"] == 2
    assert [r["num_workers"] for r in state["ranks"]] == [1, 1]      # rank 1 has rank 0's config
    r = subprocess.run(cmd + ["--max-steps", "4", "--resume", "--set", "model.code_dim=16"],
                       capture_output=True, text=True, timeout=180, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "--resume cannot change model.code_dim (8 recorded, 16 now)" in errors[0]
    assert yaml.safe_load((out / "config.yaml").read_text()) == recorded


def test_exit_rank_keeps_the_exit_status_and_flushes_output(tmp_path):
    """exit_rank skips interpreter finalization (where a gloo group DDP still holds could abort
    a finished rank), but what the rank printed still arrives and its status is kept."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent('''
        import logging, sys
        from pipelines import distributed as D
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        print("done, no newline", end="")
        logging.getLogger("x").info("logged")
        D.teardown()                  # no group: a no-op
        D.exit_rank(int(sys.argv[1]))
    '''))
    for code in (0, 3):
        r = subprocess.run([sys.executable, str(script), str(code)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert r.returncode == code
        assert r.stdout == "done, no newline"      # block-buffered (a pipe), flushed all the same
        assert "logged" in r.stderr
