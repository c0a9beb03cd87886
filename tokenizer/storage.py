"""Bytes in and out of fsspec URLs, atomically; no torch here, so that drivers and CLIs that
only read configs or write files do not pay torch's import."""
from __future__ import annotations

import os

import fsspec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not match the model; names the file."""


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{url}: cannot be read ({e})") from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to `url` so that no reader ever sees a partial file (temp + rename; one PUT on
    object stores, which are atomic per object)."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local_fs(fs):
        tmp = f"{path}.tmp-{_token()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())   # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def is_local_fs(fs) -> bool:
    """True for the local filesystem, where atomicity needs temp + rename (object stores: one PUT)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _token() -> str:
    return f"{os.getpid()}-{os.urandom(4).hex()}"
