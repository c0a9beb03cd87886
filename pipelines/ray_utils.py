"""Connecting to Ray: start the embedded local cluster explicitly, or join --address/RAY_ADDRESS.

A bare ray.init() would join whatever RAY_ADDRESS or a stale /tmp/ray/ray_current_cluster
names; we decide explicitly. Token authentication: whether a cluster uses it is asked of the
cluster itself before joining (one unauthenticated RPC to its GCS, or the job API's answer to a
request without a token), and this process's RAY_AUTH_MODE is set to match. A client in token
mode joining a cluster without it does not fail at ray.init: its actors are cancelled before
they start; a client without token mode joining a token cluster retries for 20 s. The token
comes from Ray's standard places (RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token) through Ray's own loader; it is never put in our messages, printed or logged.
"""
from __future__ import annotations

import contextlib
import os

from .errors import UserError, first_line

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_PLACES = ("RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
                "(`ray get-auth-token` on the head prints it)")
# any GCS RPC would do: this one is small, and the GCS checks the token before answering it
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def cluster_address(address: str | None) -> str | None:
    """--address wins, then RAY_ADDRESS; None means: start a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in ("local",):
        return None
    return address


def token_available() -> bool:
    """Whether Ray's token loader finds a token in its standard places (the token is not read here)."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()     # the places may have changed since a previous look in this process
    return loader.has_token(ignore_auth_mode=True)


def set_auth_mode(token: bool) -> None:
    """RAY_AUTH_MODE for this process and what it starts. Ray caches its config (the mode
    included) when first loaded, so it is re-read here, as Ray itself does when it turns token
    mode on; only valid before ray.init."""
    os.environ[AUTH_MODE_ENV] = "token" if token else "disabled"
    from ray._raylet import Config

    Config.initialize("")


def no_token_error(where: str) -> UserError:
    return UserError(f"the Ray cluster at {where} uses token authentication and no token was found "
                     f"on this machine: put the cluster's token in {TOKEN_PLACES}")


def wrong_token_error(where: str) -> UserError:
    return UserError(f"the Ray cluster at {where} refused the token found on this machine (is it this "
                     f"cluster's token?): Ray reads it from {TOKEN_PLACES}")


def gcs_status(address: str, with_token: bool, timeout: float = 5.0):
    """grpc.StatusCode of one GetClusterId call to the GCS at host:port, with this process's
    token attached or without one."""
    import grpc

    metadata = ()
    if with_token:
        from ray._raylet import AuthenticationTokenLoader
        metadata = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(GCS_PROBE_METHOD)   # raw bytes: b"" is an empty request message
        try:
            call(b"", timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def gcs_address(address: str) -> str | None:
    """host:port of the cluster's GCS; 'auto' is resolved as ray.init does; None when it cannot
    be asked: a Ray Client address (ray://), TLS, or an 'auto' that finds nothing (ray.init
    then says so)."""
    if "://" in address or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None     # Ray Client, or a TLS channel this probe cannot open
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        return canonicalize_bootstrap_address(address)
    return address


def choose_auth_mode(address: str) -> None:
    """Set this process's auth mode to the one the cluster at `address` uses, whatever
    RAY_AUTH_MODE said and whether or not a token file exists here. A token cluster with no
    token here, or another token, is a clear error at once (Ray would retry for 20 s), and so is
    an address where nothing answers. When the GCS cannot be asked (no answer in time, TLS, Ray
    Client), the mode is left to Ray and the user."""
    import grpc

    gcs = gcs_address(address)
    status = gcs_status(gcs, with_token=False) if gcs else None
    if status == grpc.StatusCode.UNAVAILABLE:      # refused: ray.init would retry for minutes
        raise UserError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                        "(is the head running, and is this its GCS port, 6379 by default?)")
    if status == grpc.StatusCode.OK:
        set_auth_mode(False)
    elif status == grpc.StatusCode.UNAUTHENTICATED:
        if not token_available():
            raise no_token_error(address)
        set_auth_mode(True)
        if gcs_status(gcs, with_token=True) == grpc.StatusCode.UNAUTHENTICATED:
            raise wrong_token_error(address)


def _init_kwargs() -> dict:
    return {"logging_level": "WARNING", "log_to_driver": True, "configure_logging": True}


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict | None = None, num_cpus: int | None = None):
    """Yield with Ray initialised: joined to `address` (or RAY_ADDRESS), else a local cluster
    sized to this machine started explicitly (address='local'). Shuts down on exit."""
    address = cluster_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        choose_auth_mode(address)
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
        raise UserError(f"cannot connect to the Ray cluster at {address}: {first_line(e)}") from None
    except ray.exceptions.AuthenticationError as e:    # the mode chosen by hand, or not found out
        raise UserError(f"the Ray cluster at {address} refused the connection: {first_line(e)} "
                        f"(Ray reads the cluster's token from {TOKEN_PLACES})") from None
    try:
        yield ray
    finally:
        if not address:
            stop_autoscaler_monitor()
        ray.shutdown()


# the embedded cluster's autoscaler monitor: it has nothing to scale, and it ignores SIGTERM, so
# ray.shutdown() waits a full second for it before killing it (docs/design.md)
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
