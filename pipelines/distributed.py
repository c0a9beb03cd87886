"""Process-group setup and teardown for torchrun-launched ranks (NCCL on CUDA, gloo on CPU).

torchrun (or SLURM through it) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
Without them this is a single process with world size 1 and no process group.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from tokenizer.collectives import Collectives


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1      # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """The device multiplies bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX instructions.
    Elsewhere oneDNN has no bf16 arithmetic to gain from, so training stays in fp32 there."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:        # private probes of torch.cpu (torch >= 2.3); a torch without them: fp32
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def setup(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's environment. The timeout bounds every
    collective, so a rank whose peer died fails instead of hanging forever."""
    rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    dev = pick_device(local_rank, device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, dev, env_int("LOCAL_WORLD_SIZE", 1))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank process after `teardown` without interpreter finalization: flush, shut
    logging down, collect (DataLoader iterators stop their worker processes), then os._exit.

    Why: after destroy_process_group, DDP internals still hold the default gloo group (even
    with the DDP wrapper deleted and collected), so its worker threads live on until the
    interpreter finalizes, and tearing them down there sometimes aborts the process ("terminate
    called without an active exception", SIGABRT; 3 exits in 190 here): torchrun then reports a
    finished, checkpointed run as failed.
    Nothing of ours is left to finalize at this point."""
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    logging.shutdown()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """In-place SUM across ranks (no-op alone)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


class ProcessGroupCollectives(Collectives):
    """The quantiser's collectives over the default process group: SUM all-reduce and broadcast."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src)


def quantizer_collectives() -> Collectives:
    """What the training stage passes as `VQVAE(config, collectives=...)`: the process group's
    collectives, or the single-process no-op when there is none."""
    return ProcessGroupCollectives() if is_distributed() else Collectives()


def all_reduce_max_async(tensor: torch.Tensor):
    """Start an in-place MAX across ranks; returns the work to `wait()` on (distributed only)."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """List of `obj` from every rank (rank order); [obj] when alone."""
    if is_distributed():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj, src: int = 0):
    if is_distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
