"""Bytes in and out of fsspec URLs, and the one atomic publish of the project (AtomicFile,
write_bytes_atomic: temp file + fsync + rename + directory fsync locally, one PUT on object
stores) that every file meant to survive a crash goes through. No torch here, so that drivers
and CLIs that only read configs or write files do not pay torch's import."""
from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not match the model; names the file."""


def join_url(base: str, *parts: str) -> str:
    """`base` (a local path or fsspec URL, with or without a trailing '/') extended by `parts`,
    '/'-separated: the one URL join of the project (pipelines use it too)."""
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{url}: cannot be read ({e})") from None


def write_bytes_atomic(url: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Write `url` so that no reader ever sees a partial file and, once this returns, the file
    survives a crash (see AtomicFile). Object stores get one PUT of the bytes, atomic per object."""
    fs, path = fsspec.core.url_to_fs(url)
    if not is_local_fs(fs):
        parent = _parent(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return
    with AtomicFile(url, tmp_dir) as f:
        f.write(data)


class AtomicFile:
    """A local temporary file that becomes `url` complete or not at all.

    `file` is the open binary file to write. publish(): local targets are fsynced, renamed into
    place and their directory fsynced (the bytes are on disk before the name points at them, and
    the name survives a crash); object stores get the finished file in one upload. discard() (or
    leaving a `with` block by an exception) removes the temporary file; the target is untouched.
    The temporary file lives in `tmp_dir` (on the target's filesystem; default: the target's
    directory) as a hidden `.NAME.tmp-PID-RANDOM` (NAME cut to 96 bytes), which no shard pattern
    or listing of `*.tar` matches; for object stores it lives in the local temp directory.
    """

    def __init__(self, url: str, tmp_dir: str | None = None):
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.local = is_local_fs(self.fs)
        parent = _parent(self.path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        where = None
        if self.local:
            where = fsspec.core.url_to_fs(tmp_dir)[1] if tmp_dir else (parent or ".")
            os.makedirs(where, exist_ok=True)
        # a prefix of the name (names may already be 255 bytes long, the usual limit) + a token
        name = self.path.rsplit("/", 1)[-1].encode()[:96].decode(errors="ignore")
        self.tmp = os.path.join(where, f".{name}{_TEMP_MARK}{_token()}") if self.local else \
            os.path.join(tempfile.gettempdir(), f"vqtok-{_token()}-{name}")
        # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() would give
        # the published file (mkstemp's 0o600 would make outputs private to this user)
        self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")

    def publish(self) -> None:
        try:
            self.file.flush()
            if self.local:
                os.fsync(self.file.fileno())
            self.file.close()
            if self.local:
                os.replace(self.tmp, self.path)
                _fsync_dir(_parent(self.path) or ".")
            else:
                self.fs.put_file(self.tmp, self.path)
        finally:
            self._remove_tmp()

    def discard(self) -> None:
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if not self.file.closed:
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.publish()
        else:
            self.discard()


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (POSIX); filesystems that cannot fsync a directory
    (some network mounts) skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_local_fs(fs) -> bool:
    """True for the local filesystem, where atomicity needs temp + rename (object stores: one PUT)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


_TEMP_MARK = ".tmp-"


def temporary_target(name: str) -> str | None:
    """The name that AtomicFile's local temporary file `name` (a base name) would have been
    published under (cut to 96 bytes, as the temporary name is), or None for any other name:
    how a later run finds the leftovers of a writer that was killed."""
    if not name.startswith(".") or _TEMP_MARK not in name:
        return None
    return name[1:name.rindex(_TEMP_MARK)]


def _token() -> str:
    return f"{os.getpid()}-{os.urandom(4).hex()}"
