"""`vqtok submit`: run a vqtok command as a Ray job on a cluster (Ray's job API).

The job's runtime env carries vqtok's own packages (pipelines/ and tokenizer/, as py_modules),
wherever they are installed: a checkout, an editable install or a wheel in site-packages. Never
their neighbours (in site-packages: every other installed package), data or weights: the job
reads those from their URLs, and its dependencies (torch, ...) come from the cluster's
environment. Token auth is found out from the job API itself (see ray_utils); the token is
never printed.
"""
from __future__ import annotations

import asyncio
import importlib.util
import shlex
import sys
import time

from .errors import UserError, first_line
from .ray_utils import no_token_error, set_auth_mode, token_available, wrong_token_error

PACKAGES = ("pipelines", "tokenizer")
# never uploaded from inside the packages: data, weights, outputs, caches
EXCLUDES = ["**/__pycache__", "*.pyc", "*.tar", "*.tar.gz", "*.tgz", "*.parquet", "*.safetensors", "*.pt",
            "*.pth", "*.ckpt", "*.bin", "*.npy", "*.npz", "*.gz", "*.zip"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# `python -m` puts the current directory first on sys.path, and a job without working_dir runs
# in the cwd of the head's `ray start`: a `pipelines` directory there would be run instead of
# the shipped one. PYTHONSAFEPATH (Python >= 3.11) leaves it out, for this process only.
ENTRYPOINT = "PYTHONSAFEPATH=1 python -m pipelines "


def package_dirs() -> list[str]:
    """The directories of vqtok's packages as this process imports them (not imported here:
    tokenizer would load torch)."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if len(locations) != 1:
            raise UserError(f"cannot find the installed `{name}` package to ship with the job "
                            f"(found {locations or 'none'}); is vqtok installed?")
        dirs.append(locations[0])
    return dirs


def runtime_env() -> dict:
    return {"py_modules": package_dirs(), "excludes": EXCLUDES}


def job_client(address: str):
    """A JobSubmissionClient for `address`: asked first without a token, as Ray's default; on
    a refusal for a missing token, again with this machine's token (Ray's loader attaches it)."""
    from ray.exceptions import AuthenticationError

    set_auth_mode(False)
    try:
        return _connect(address)
    except AuthenticationError:         # 401: the job API wants a token
        if not token_available():
            raise no_token_error(address) from None
    set_auth_mode(True)
    try:
        return _connect(address)
    except AuthenticationError:         # 403: not this cluster's token
        raise wrong_token_error(address) from None


def _connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)     # asks the job API for its version
    except AuthenticationError:
        raise
    except Exception as e:
        raise UserError(f"cannot reach the Ray job API at {address}: {first_line(e)}") from None


def submit(address: str, args: list[str], wait: bool, out=sys.stdout) -> int:
    """Submit `python -m pipelines ARGS` with vqtok's packages as py_modules; returns the exit
    status (0 at once without `wait`)."""
    if not args:
        raise UserError("nothing to submit: give the command after --, e.g. "
                        "vqtok submit --address http://HEAD:8265 -- tokenize --tokenizer ...")
    client = job_client(address)
    entrypoint = ENTRYPOINT + " ".join(shlex.quote(a) for a in args)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
    except Exception as e:
        raise UserError(f"job submission to {address} failed: {first_line(e)}") from None
    print(job_id, file=out, flush=True)
    if not wait:
        return 0
    asyncio.run(_stream_logs(client, job_id, out))
    status = _final_status(client, job_id)
    print(f"job {job_id} {status}", file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else 1


async def _stream_logs(client, job_id: str, out) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _final_status(client, job_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        status = str(getattr(status, "value", status))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
