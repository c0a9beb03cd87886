"""Connecting to Ray: start the embedded local cluster explicitly, or join --address/RAY_ADDRESS.

A bare ray.init() would join whatever RAY_ADDRESS or a stale /tmp/ray/ray_current_cluster
names; we decide explicitly. Token authentication (on by default for `ray start` since Ray
2.5x): when joining, the token is taken from Ray's standard places — RAY_AUTH_TOKEN,
the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token — and RAY_AUTH_MODE=token is set
for this process when a token exists and the mode was not chosen. The token itself is never
read into our messages, printed or logged; Ray's client attaches it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError

AUTH_MODE_ENV = "RAY_AUTH_MODE"


def cluster_address(address: str | None) -> str | None:
    """--address wins, then RAY_ADDRESS; None means: start a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in ("local",):
        return None
    return address


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    return any(p.is_file() and p.stat().st_size > 0 for p in candidates)


def configure_token_auth() -> None:
    """Turn on token auth for this process (and its children) when a token is available and
    the user did not choose RAY_AUTH_MODE. Must run before ray is imported."""
    if AUTH_MODE_ENV not in os.environ and token_available():
        os.environ[AUTH_MODE_ENV] = "token"


def _init_kwargs() -> dict:
    return {"logging_level": "WARNING", "log_to_driver": True, "configure_logging": True}


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict | None = None, num_cpus: int | None = None):
    """Yield with Ray initialised: joined to `address` (or RAY_ADDRESS), else a local cluster
    sized to this machine started explicitly (address='local'). Shuts down on exit."""
    address = cluster_address(address)
    if address:
        configure_token_auth()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    kwargs = _init_kwargs()
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                     include_dashboard=False, **kwargs)
    except ConnectionError as e:
        hint = "" if token_available() else (
            "; if the cluster uses token authentication, put its token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
        raise UserError(f"cannot connect to the Ray cluster at {address}: {_first_line(e)}{hint}") from None
    except Exception as e:
        if type(e).__name__ == "AuthenticationError":
            raise UserError(f"the Ray cluster at {address} refused the connection: "
                            f"{_first_line(e)} (set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's "
                            "token; see docs/tokenize.md)") from None
        raise
    try:
        yield ray
    finally:
        if not address:
            stop_autoscaler_monitor()
        ray.shutdown()


# the embedded cluster's autoscaler monitor: it has nothing to scale, and it ignores SIGTERM, so
# ray.shutdown() waits a full second for it before killing it (measured: 1.4 s -> 0.2-0.4 s)
MONITOR_SCRIPT = "autoscaler/_private/monitor.py"


def stop_autoscaler_monitor() -> int:
    """SIGKILL the autoscaler monitor among this process's children; returns how many.
    Only for a cluster this process started itself."""
    import psutil

    killed = 0
    for proc in psutil.Process().children():    # ray.init starts it as our own child
        try:
            if any(arg.endswith(MONITOR_SCRIPT) for arg in proc.cmdline()):
                proc.kill()
                killed += 1
        except psutil.Error:   # gone already, or not ours to inspect
            continue
    return killed


def auth_hint(message: str) -> str:
    if "uthenticat" not in message and "Unauthorized" not in message and "Forbidden" not in message:
        return ""
    return (" (the cluster uses token authentication: put its token in RAY_AUTH_TOKEN, the file "
            "named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
