"""`vqtok submit`: run a vqtok command as a Ray job on a cluster (Ray's job API).

The job's runtime env carries the project's code (the directory holding pipelines/ and
tokenizer/), never data or weights: those are read by the job from their URLs. Token auth comes
from Ray's standard places (see ray_utils); the token is never printed.
"""
from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError
from .ray_utils import auth_hint, configure_token_auth

# never uploaded: data, weights, outputs, environments, VCS metadata
EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.tar", "*.tar.gz", "*.tgz", "*.parquet",
            "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.bin", "*.npy", "*.npz", "*.gz", "*.zip",
            "runs", "data", "demo_out", ".pytest_cache", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_dir() -> Path:
    """The directory that holds the pipelines and tokenizer packages."""
    return Path(__file__).resolve().parent.parent


def job_client(address: str):
    configure_token_auth()
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        msg = _first_line(e)
        raise UserError(f"cannot reach the Ray job API at {address}: {msg}{auth_hint(msg)}") from None


def submit(address: str, args: list[str], wait: bool, out=sys.stdout) -> int:
    """Submit `python -m pipelines ARGS` with the code as working_dir; returns the exit status."""
    if not args:
        raise UserError("nothing to submit: give the command after --, e.g. "
                        "vqtok submit --address http://HEAD:8265 -- tokenize --tokenizer ...")
    client = job_client(address)
    entrypoint = "python -m pipelines " + " ".join(shlex.quote(a) for a in args)
    runtime_env = {"working_dir": str(project_dir()), "excludes": EXCLUDES}
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except Exception as e:
        msg = _first_line(e)
        raise UserError(f"job submission to {address} failed: {msg}{auth_hint(msg)}") from None
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


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
