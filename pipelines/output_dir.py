"""The directory a command writes into (`vqtok tokenize --output`, `decode --out`, `eval --out`):
made, or checked writable, before any work, else a one-line error naming the option."""
from __future__ import annotations

import os

import fsspec

from tokenizer.storage import is_local_fs

from .errors import UserError


def make_output_dir(url: str, option: str) -> None:
    """Create the directory `url` (and its parents) that a command writes into, and on a local
    disk check that a file can be created there, before any work; otherwise UserError
    '<option> <url>: <why>' (a regular file, a parent that is a file, a read-only or virtual
    filesystem such as /proc). Object stores have no directories to check."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise UserError(f"{option} {url}: unsupported URL ({e})") from None
    if not is_local_fs(fs):       # object stores have no directories to create
        try:
            is_file = fs.isfile(root)
        except OSError as e:
            raise UserError(f"{option} {url}: cannot be reached ({e})") from None
        if is_file:
            raise UserError(f"{option} {url}: is a file, not a directory")
        return
    try:
        fs.makedirs(root, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{option} {url}: is a file, not a directory") from None
    except NotADirectoryError:
        raise UserError(f"{option} {url}: cannot be created, a parent of it is a file") from None
    except OSError as e:
        raise UserError(f"{option} {url}: cannot be created ({e.strerror or e})") from None
    probe = os.path.join(root, f".vqtok-write-test-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {url}: files cannot be created in it ({e.strerror or e})") from None
