"""Training checkpoints: RUN_DIR/checkpoints/step-XXXXXXXX.pt, written atomically, last k kept.

Contents (plain tensors and Python containers only, so torch.load(weights_only=True) reads them):
model state (incl. the codebook's EMA buffers), optimizer, LR scheduler, step, per-rank RNG
states and data positions, and the config.
"""
from __future__ import annotations

import io
import random
import re

import fsspec
import torch

from tokenizer import CheckpointError
from tokenizer.storage import temporary_target, write_bytes_atomic

NAME = re.compile(r"step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return run_dir.rstrip("/") + "/checkpoints"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(step, url)] sorted by step."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    if not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        m = NAME.search(p)
        if m:
            found.append((int(m.group(1)), p if "://" not in run_dir else fs.unstrip_protocol(p)))
    return sorted(found)


def remove_partial_checkpoints(run_dir: str) -> list[str]:
    """Delete the temporary files of saves that were killed mid-write (a run killed while saving
    leaves one as large as a checkpoint). Only the main rank of a starting run calls this, before
    it saves anything, so no live writer owns them. Returns the removed paths."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    if not fs.exists(path):
        return []
    partial = [p for p in fs.ls(path, detail=False)
               if NAME.fullmatch(temporary_target(p.rsplit("/", 1)[-1]) or "")]
    for p in partial:
        fs.rm(p)
    return partial


def save_checkpoint(run_dir: str, step: int, state: dict, keep: int) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    url = f"{checkpoint_dir(run_dir)}/step-{step:08d}.pt"
    write_bytes_atomic(url, buf.getvalue())
    for _, old in list_checkpoints(run_dir)[:-keep]:
        fs, path = fsspec.core.url_to_fs(old)
        fs.rm(path)
    return url


def load_checkpoint(url: str) -> dict:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{url}: cannot load training checkpoint ({str(e).splitlines()[0]})") from None
    for key in ("model", "optimizer", "step"):
        if key not in state:
            raise CheckpointError(f"{url}: not a vqtok training checkpoint (no {key!r})")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
