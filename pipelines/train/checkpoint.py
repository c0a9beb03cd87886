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

from .. import distributed as D
from ..errors import SharedError

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


def checkpoint_to_resume(run_dir: str, resume: bool, is_main: bool) -> str | None:
    """The checkpoint a starting run continues from (None: a fresh start), decided by the main
    rank and the same on every rank (a collective). Checkpoints without --resume are a
    SharedError; before a run saves anything here, leftovers of killed saves are removed."""
    decision = None
    if is_main:
        found = list_checkpoints(run_dir)
        if resume or not found:     # a run that will save here: no earlier writer is alive
            remove_partial_checkpoints(run_dir)
        if found and not resume:
            decision = ("error", f"{run_dir} already has checkpoints (newest step {found[-1][0]}); "
                        "pass --resume to continue or choose another --out")
        elif found:
            decision = ("load", found[-1][1])
    decision = D.broadcast_object(decision)
    if decision is None:
        return None
    if decision[0] == "error":
        raise SharedError(decision[1])
    return decision[1]


def same_data_layout(per_rank: list[dict], world_size: int, num_workers: int) -> bool:
    """The checkpoint's per-rank records were written by `world_size` ranks of `num_workers`
    data workers each: every data slot's recorded position carries over. 0 workers (the rank
    reads itself) and 1 worker read the same one slot per rank, so they count as the same layout."""
    def slots(workers) -> int | None:
        return max(1, workers) if isinstance(workers, int) else None
    return len(per_rank) == world_size and all(slots(r.get("num_workers")) == slots(num_workers)
                                               for r in per_rank)


def resume_data_positions(per_rank: list[dict], rank: int, world_size: int,
                          num_workers: int) -> tuple[dict[int, tuple[int, int]], str]:
    """({data slot: (epoch, offset)} where this rank's slots continue, a note for the log).
    With the layout that wrote the checkpoint, the recorded positions. Otherwise the epoch's
    split over ranks x workers changed, so no slot's position carries over: every slot starts
    the next epoch from its beginning (no sample of the epoch in progress is seen twice, and
    the rest of it is skipped)."""
    if not per_rank:
        return {}, ""
    if same_data_layout(per_rank, world_size, num_workers):
        return {int(w): tuple(p) for w, p in per_rank[rank]["positions"].items()}, ""
    epoch = 1 + max((int(p[0]) for r in per_rank for p in r.get("positions", {}).values()), default=-1)
    was = f"{len(per_rank)} ranks x {per_rank[0].get('num_workers')} data workers"
    note = (f"; the checkpoint was written by {was}, this run has {world_size} x {num_workers}, so "
            f"the data stream starts epoch {epoch} from its beginning")
    return {w: (epoch, 0) for w in range(max(1, num_workers))}, note


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
