"""Shared fixtures of tests/pipelines: real services on loopback only.

- moto_s3: an S3 API (moto in server mode) on 127.0.0.1, with the AWS_* environment that s3fs
  (and Ray workers started with it) use to reach it.
- ray_head: one `ray start --head` on 127.0.0.1 with explicit ports, its own temp dir and token
  authentication, shared by the session and stopped by PID; ray_head_no_auth: the same without
  token authentication (started only when a test asks for it).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports. The sockets stay bound until all are picked: ports asked
    for one at a time may come back equal (the kernel can hand a just-closed port out again)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


@pytest.fixture(scope="session")
def moto_s3():
    """{'endpoint', 'env'}: a moto S3 server; env holds the AWS_* variables for clients."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    try:
        yield {"endpoint": endpoint, "env": env}
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    """Point this process's s3fs at the moto server for one test."""
    for key, value in moto_s3["env"].items():
        monkeypatch.setenv(key, value)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    yield moto_s3
    s3fs.S3FileSystem.clear_instance_cache()


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="session")
def ray_head(moto_s3):
    """A Ray head with token auth on 127.0.0.1 (2 CPUs). Yields {'address', 'dashboard', 'env',
    'token'}: `env` is what a client needs (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Its workers
    see the moto S3 environment."""
    with start_ray_head(moto_s3["env"], token=secrets.token_hex(16)) as head:
        yield head


@pytest.fixture(scope="session")
def ray_head_no_auth(moto_s3):
    """A Ray head without token auth (RAY_AUTH_MODE=disabled), 1 CPU; same keys as ray_head,
    with token None and an empty client env."""
    with start_ray_head(moto_s3["env"], token=None, num_cpus=1) as head:
        yield head


@contextlib.contextmanager
def start_ray_head(worker_env: dict, token: str | None, num_cpus: int = 2):
    """`ray start --head --block` on 127.0.0.1 with free ports and its own temp dir, token auth
    on with `token` (passed in RAY_AUTH_TOKEN: nothing is written to ~/.ray) or off when None;
    stopped by PID."""
    temp_dir = tempfile.mkdtemp(prefix="vqr-", dir="/tmp")   # short: Unix socket paths are limited
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {}
    env = {**os.environ, **worker_env, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token" if token else "disabled",
           # the cluster's `python` (job entrypoints) is this venv's, as on a real node image
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_AUTH_TOKEN", None)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    gcs, dash, node_manager, object_manager, client, metrics, agent, agent_grpc, runtime_env = free_ports(9)
    # worker port ranges apart from each other: one per head of this process
    worker_lo = 20000 + (os.getpid() % 200) * 100 if token else 10000 + (os.getpid() % 200) * 50
    args = [_ray_bin(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--min-worker-port", str(worker_lo),
            "--max-worker-port", str(worker_lo + (99 if token else 49)), "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(200 << 20), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": client_env,
            "token": token, "pid": proc.pid, "temp_dir": temp_dir}
    try:
        _wait_for_dashboard(proc, dash, temp_dir)
        yield head
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(proc, port: int, temp_dir: str, timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ray start --head exited: " + open(os.path.join(temp_dir, "head.log")).read()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:   # 401 without the token: it is up
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the Ray head did not come up in time")


def _stop_group(proc) -> None:
    """SIGTERM the `ray start --block` process (it stops its node), then SIGKILL what is left of
    the process group it leads (only processes this fixture started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@pytest.fixture(scope="session")
def tokenized_output(tmp_path_factory):
    """A clean output made once by the real `vqtok tokenize` (embedded local Ray): shards
    train-00000{0,1,2} of 20 Fashion-MNIST images and bad-000000 (2 good samples, 1 undecodable:
    it has an _errors file). train-000003.tar exists but was not tokenized. Copy `output` before
    changing it. {'output', 'dir', 'tok', 'inputs': the job's --input patterns}."""
    import tok_data as td

    root = tmp_path_factory.mktemp("verify")
    tok, shards = root / "tok", root / "in"
    shards.mkdir()
    td.save_tokenizer(tok)
    td.write_fmnist_shards(shards, 4, 20)
    images, labels = td.fashion_mnist(2)
    bad = td.fmnist_samples(images, labels, "bad-") + [("bad-garbage", {"png": b"not a png", "cls": b"0"})]
    td.write(shards / "bad-000000.tar", td.tar_bytes(bad))
    inputs = [f"{shards}/train-{{000000..000002}}.tar", f"{shards}/bad-000000.tar"]
    out = str(root / "out")
    args = ["tokenize", "--tokenizer", str(tok), "--output", out, "--keep-fields", "cls", "--workers", "2",
            "--max-error-rate", "0.5", "--no-progress"]
    for pattern in inputs:
        args += ["--input", pattern]
    proc = td.vqtok(args, env={"HOME": str(root / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"output": out, "dir": str(shards), "tok": str(tok), "inputs": inputs}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tiny k-means-initialised 28x28 grey tokenizer (tok_data.save_tokenizer)."""
    import tok_data as td
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)
