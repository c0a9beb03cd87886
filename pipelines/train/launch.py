"""`vqtok train`: validate, then run in this process (one rank) or launch torchrun (several)."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from tokenizer import CheckpointError, ConfigError

from .. import distributed as D
from ..data import expand_urls
from ..errors import UserError
from .config import TrainConfig, resolve_config
from .data import check_first_sample
from .stop import STOP_SIGNALS

USER_ERROR_EXIT = 3   # a rank exits with this after printing its one-line "Error: ..."
PEER_FAILED_EXIT = 4  # a rank whose collective broke because another rank failed
USER_ERRORS = (UserError, ConfigError, CheckpointError)


@dataclass
class TrainArgs:
    config: str | None
    train_data: list[str]
    out: str
    val_data: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_steps: int | None = None
    batch_size: int | None = None
    resume: bool = False
    sets: list[str] = field(default_factory=list)

    def resolve(self) -> TrainConfig:
        return resolve_config(self.config, self.sets, train_data=self.train_data, val_data=self.val_data,
                              max_steps=self.max_steps, batch_size=self.batch_size)


def rank_argv(a: TrainArgs) -> list[str]:
    """Arguments for `python -m pipelines.train` on every rank (the same for all)."""
    argv = ["--out", a.out]
    if a.config:
        argv += ["--config", a.config]
    for url in a.train_data:
        argv += ["--train-data", url]
    for url in a.val_data:
        argv += ["--val-data", url]
    if a.max_steps is not None:
        argv += ["--max-steps", str(a.max_steps)]
    if a.batch_size is not None:
        argv += ["--batch-size", str(a.batch_size)]
    if a.resume:
        argv += ["--resume"]
    for s in a.sets:
        argv += ["--set", s]
    return argv


def parse_rank_argv(argv: list[str]) -> TrainArgs:
    p = argparse.ArgumentParser(prog="python -m pipelines.train",
                                description="One vqtok training rank (run it under torchrun or SLURM).")
    p.add_argument("--config")
    p.add_argument("--train-data", action="append", default=[])
    p.add_argument("--val-data", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", dest="sets", action="append", default=[])
    ns = p.parse_args(argv)
    return TrainArgs(config=ns.config, train_data=ns.train_data, val_data=ns.val_data, out=ns.out,
                     max_steps=ns.max_steps, batch_size=ns.batch_size, resume=ns.resume, sets=ns.sets)


def preflight(cfg: TrainConfig) -> None:
    """User mistakes caught before any rank starts: shards, channels and size of the data."""
    train = expand_urls(cfg.data.train)
    check_first_sample(train, cfg.model.in_channels, cfg.model.resolution, cfg.data.strict_size)
    if cfg.data.val:
        check_first_sample(expand_urls(cfg.data.val), cfg.model.in_channels, cfg.model.resolution,
                           cfg.data.strict_size)


def run_rank(a: TrainArgs) -> str:
    """Body of one rank: join the process group, train, export, leave."""
    from .loop import Trainer
    cfg = a.resolve()
    info = D.setup(cfg.train.device, cfg.train.timeout_s)
    try:
        return Trainer(cfg, a.out, info, resume=a.resume).run()
    finally:
        D.teardown()


def torchrun_argv(a: TrainArgs) -> list[str]:
    argv = ["--nproc-per-node", str(a.nproc_per_node), "--nnodes", str(a.nnodes), "--max-restarts", "0"]
    if a.nnodes == 1:
        argv += ["--standalone"]
    else:
        argv += ["--node-rank", str(a.node_rank), "--master-addr", a.master_addr,
                 "--master-port", str(a.master_port)]
    return argv + ["-m", "pipelines.train"] + rank_argv(a)


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run torchrun in its own session and pass it the first SIGTERM/SIGINT we get, once: its
    agent hands it to the ranks, which checkpoint and exit. (In our process group, a Ctrl-C would
    reach the agent twice, and a second signal cuts short the agent's wait for the ranks.)"""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    forwarded = []

    def forward(signum, frame):
        if not forwarded:
            forwarded.append(signum)
            proc.send_signal(signum)
            print(f"[vqtok train] {signal.Signals(signum).name}: the ranks stop after this step and "
                  "save a checkpoint", file=sys.stderr, flush=True)

    old = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if proc.poll() is None:      # we are leaving on an exception: do not orphan the job
            proc.kill()
            proc.wait()


def launch(a: TrainArgs) -> str | None:
    if a.nproc_per_node < 1 or a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        raise UserError(f"need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes "
                        f"(got {a.nproc_per_node}, {a.nnodes}, {a.node_rank})")
    cfg = a.resolve()
    preflight(cfg)
    world = a.nproc_per_node * a.nnodes
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} (global) is not divisible by "
                          f"the {world} ranks")
    if world == 1:
        return run_rank(a)
    cmd = [sys.executable, "-m", "pipelines.train.torchrun"] + torchrun_argv(a)
    env = {"PYTHONUNBUFFERED": "1", **os.environ}
    # torchrun would force 1 thread per rank (with a warning); share this node's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.nproc_per_node)))
    rc = run_forwarding_signals(cmd, env)
    if rc != 0:
        sys.exit(rc)    # the failing rank already printed its one-line error
    return f"{a.out.rstrip('/')}/final"
