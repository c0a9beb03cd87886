"""Joining a Ray cluster with and without token authentication, with and without a token on the
client, never setting RAY_AUTH_MODE by hand: every combination runs a real `vqtok tokenize
--address` to a complete output, or ends at once in a one-line error naming where the token
goes. The clients get a HOME of their own: this machine's ~/.ray is never read or written."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import tok_data as td
from test_tokenize_ray import check_rows, read_rows, summary_of


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir):
    return td.shard_set(tmp_path_factory.mktemp("shards"), tok_dir, 2, 60)


def client_env(home, token: str | None = None, **extra) -> dict:
    """This process's environment without any RAY_AUTH_* setting or RAY_ADDRESS, HOME=`home`
    with ~/.ray/auth_token holding `token` (none when None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token)
    return {**env, "HOME": str(home), **extra}


def tokenize(tmp_path, tok_dir, shards, address, env):
    out = str(tmp_path / "out")
    args = ["tokenize", "--tokenizer", tok_dir, "--input", shards["pattern"], "--output", out,
            "--keep-fields", "cls", "--address", address, "--workers", "1", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], env=env, capture_output=True,
                          text=True, timeout=240)
    return proc, out


def assert_complete(proc, out, shards, token=None):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_of(proc)["samples"]["ok"] == 120
    check_rows(read_rows(out), shards)
    if token:
        assert token not in proc.stdout + proc.stderr


# (cluster uses token auth, the client has the token file, RAY_AUTH_MODE left in the client's env)
@pytest.mark.parametrize("token_file,stale_mode", [(True, None), (False, None), (True, "token")],
                         ids=["stale-token-file", "no-token-file", "stale-token-file-and-mode"])
def test_cluster_without_token_auth_joins_whatever_the_client_has(tmp_path, tok_dir, shards, ray_head_no_auth,
                                                                   token_file, stale_mode):
    # a token file left by an earlier local Ray (or a RAY_AUTH_MODE=token in the shell) used to
    # switch the client to token mode: its actors were cancelled before they started
    extra = {"RAY_AUTH_MODE": stale_mode} if stale_mode else {}
    env = client_env(tmp_path / "home", "f" * 32 if token_file else None, **extra)
    proc, out = tokenize(tmp_path, tok_dir, shards, ray_head_no_auth["address"], env)
    assert_complete(proc, out, shards)


def test_cluster_with_token_auth_joins_with_the_token_file(tmp_path, tok_dir, shards, ray_head):
    env = client_env(tmp_path / "home", ray_head["token"])
    proc, out = tokenize(tmp_path, tok_dir, shards, ray_head["address"], env)
    assert_complete(proc, out, shards, token=ray_head["token"])


def test_cluster_with_token_auth_joins_with_the_token_in_RAY_AUTH_TOKEN_PATH(tmp_path, tok_dir, shards,
                                                                             ray_head):
    path = tmp_path / "elsewhere" / "token"
    path.parent.mkdir()
    path.write_text(ray_head["token"])
    env = client_env(tmp_path / "home", None, RAY_AUTH_TOKEN_PATH=str(path), RAY_ADDRESS=ray_head["address"])
    out = str(tmp_path / "out")           # the address from RAY_ADDRESS this time
    proc = subprocess.run([sys.executable, "-m", "pipelines", "tokenize", "--tokenizer", tok_dir, "--input",
                           shards["pattern"], "--output", out, "--keep-fields", "cls", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert_complete(proc, out, shards, token=ray_head["token"])


@pytest.mark.parametrize("token", [None, "0" * 32], ids=["no-token", "wrong-token"])
def test_cluster_with_token_auth_and_no_or_another_token_is_a_clear_error_at_once(tmp_path, tok_dir, shards,
                                                                                  ray_head, token):
    env = client_env(tmp_path / "home", token)
    t0 = time.monotonic()
    proc, out = tokenize(tmp_path, tok_dir, shards, ray_head["address"], env)
    took = time.monotonic() - t0
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    if token is None:
        assert "uses token authentication and no token was found" in error[0]
    else:
        assert "refused the token found on this machine" in error[0] and token not in proc.stderr
    assert "RAY_AUTH_TOKEN" in error[0] and "~/.ray/auth_token" in error[0]
    assert took < 20, took        # Ray alone retries for 20 s before giving up
    assert not os.path.exists(f"{out}/_SUCCESS")


def test_unreachable_address_is_a_clear_error(tmp_path, tok_dir, shards):
    from conftest import free_port
    proc, _ = tokenize(tmp_path, tok_dir, shards, f"127.0.0.1:{free_port()}", client_env(tmp_path / "home"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot connect to the Ray cluster at 127.0.0.1:" in proc.stderr and "nothing answers" in proc.stderr


TOKEN_AND_MODE = r"""
import os, pathlib, sys
from ray._raylet import AuthenticationMode, get_authentication_mode
from pipelines import ray_utils
home = pathlib.Path(sys.argv[1])
assert not ray_utils.token_available()
(home / ".ray").mkdir()
(home / ".ray" / "auth_token").write_text("a" * 32)
assert ray_utils.token_available()
(home / ".ray" / "auth_token").unlink()
(home / "t").write_text("b" * 32)
os.environ["RAY_AUTH_TOKEN_PATH"] = str(home / "t")
assert ray_utils.token_available()
del os.environ["RAY_AUTH_TOKEN_PATH"]
os.environ["RAY_AUTH_TOKEN"] = "c" * 32
assert ray_utils.token_available()
ray_utils.set_auth_mode(True)       # Ray's cached config sees it at once
assert os.environ["RAY_AUTH_MODE"] == "token"
assert get_authentication_mode() == AuthenticationMode.TOKEN
ray_utils.set_auth_mode(False)
assert get_authentication_mode() == AuthenticationMode.DISABLED
print("ok")
"""


def test_token_available_and_auth_mode_follow_ray_itself(tmp_path):
    # in a process of its own: Ray's token loader and cached config are process-wide, and a
    # token or mode left behind here would reach every later in-process Ray driver of the suite
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", TOKEN_AND_MODE, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cluster_address_from_option_or_environment(monkeypatch):
    from pipelines import ray_utils
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_utils.cluster_address(None) is None and ray_utils.cluster_address("h:6379") == "h:6379"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_utils.cluster_address(None) == "head:6379"
    assert ray_utils.cluster_address("local") is None
    assert ray_utils.gcs_address("ray://head:10001") is None and ray_utils.gcs_address("h:1") == "h:1"


def test_stop_autoscaler_monitor_kills_only_the_monitor(tmp_path):
    # the embedded cluster's monitor ignores SIGTERM; it is killed before ray.shutdown, and
    # nothing else is touched
    import signal
    import subprocess
    import sys
    from pipelines import ray_utils
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    monitor_path = tmp_path / "autoscaler" / "_private" / "monitor.py"
    monitor_path.parent.mkdir(parents=True)
    monitor_path.write_text(script)
    other_path = tmp_path / "log_monitor.py"
    other_path.write_text(script)
    monitor = subprocess.Popen([sys.executable, str(monitor_path)])
    other = subprocess.Popen([sys.executable, str(other_path)])
    try:
        assert ray_utils.stop_autoscaler_monitor() == 1
        assert monitor.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for proc in (monitor, other):
            proc.kill()
            proc.wait()
