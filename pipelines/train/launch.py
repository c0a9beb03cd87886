"""`vqtok train`: resolve the config once, check, record it, then run in this process (one rank)
or launch torchrun (several), whose ranks read the recorded config.

The launcher, the rank process wrapper and the config hand-over are shared by every trainer (a
Stage says which): `vqtok train` (the tokenizer) and `vqtok prior train` (pipelines/prior)."""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch.distributed as dist

from .. import distributed as D
from ..shards.urls import expand_urls
from ..errors import (ERROR_SAID_ENV, RANK_PEER_FAILED_EXIT, RANK_USER_ERROR_EXIT, USER_ERRORS, ConfigError,
                      Reported, SharedError, Stopped, UserError)
from ..output_dir import make_output_dir
from .config import TrainConfig, parse_config, read_config_text, record_run_config, resolve_config, run_config_url
from .data import check_first_sample
from .stop import STOP_SIGNALS

# how long ranks 1.. wait for rank 0 to resolve and check the config (it may read a shard from
# an object store first); a rank 0 that dies instead is noticed by torchrun much sooner
SHARE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class TrainArgs:
    """What `vqtok train` (or `python -m pipelines.train` without --run-config) was given."""
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


def preflight(cfg: TrainConfig, world: int) -> None:
    """User mistakes caught before any rank starts: shards, channels and size of the data, and a
    global batch that the ranks cannot share evenly."""
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} (global) is not divisible by "
                          f"the {world} ranks")
    train = expand_urls(cfg.data.train)
    check_first_sample(train, cfg.model.in_channels, cfg.model.resolution, cfg.data.strict_size)
    if cfg.data.val:
        check_first_sample(expand_urls(cfg.data.val), cfg.model.in_channels, cfg.model.resolution,
                           cfg.data.strict_size)


def prepare_run(a: TrainArgs, world: int, record: bool = True) -> tuple[TrainConfig, str]:
    """The one resolution of a run's config: YAML + --set + flags, checked, and (where `record`:
    the launcher of node 0, or rank 0) written to RUN_DIR/config.yaml. -> (config, its text)."""
    cfg = a.resolve()
    preflight(cfg, world)
    if record:
        make_output_dir(a.out, "--out")
    text = record_run_config(cfg, a.out, a.resume) if record else None
    return cfg, text


# ---- ranks ------------------------------------------------------------------------------------
def parse_rank_argv(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description="One vqtok training rank (run it under torchrun or SLURM). Rank 0 resolves the "
                    "config options below once and records them in OUT/config.yaml; every rank "
                    "trains with that text. With --run-config, rank 0 reads a recorded one instead.")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--run-config", help="a config recorded by `vqtok train` (OUT/config.yaml); "
                                        "excludes the options after it")
    p.add_argument("--config")
    p.add_argument("--train-data", action="append", default=[])
    p.add_argument("--val-data", action="append", default=[])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", dest="sets", action="append", default=[])
    ns = p.parse_args(argv)
    given = [flag for flag, value in (("--config", ns.config), ("--train-data", ns.train_data),
                                      ("--val-data", ns.val_data), ("--max-steps", ns.max_steps),
                                      ("--batch-size", ns.batch_size), ("--set", ns.sets)) if value]
    if ns.run_config and given:
        p.error(f"--run-config is a resolved config: {', '.join(given)} cannot change it")
    return ns


def rank_config_text(ns: argparse.Namespace, world: int) -> str:
    """On rank 0: the config text every rank trains with (read, or resolved and recorded)."""
    if ns.run_config:
        text = read_config_text(ns.run_config)
        if text is None:
            raise UserError(f"{ns.run_config}: no recorded run config there")
        parse_config(text, ns.run_config)      # a broken file is named on rank 0
        return text
    a = TrainArgs(config=ns.config, train_data=ns.train_data, val_data=ns.val_data, out=ns.out,
                  max_steps=ns.max_steps, batch_size=ns.batch_size, resume=ns.resume, sets=ns.sets)
    return prepare_run(a, world)[1]


def share_from_rank0(produce: Callable[[], str]) -> tuple[str, object]:
    """Rank 0 runs `produce`; every rank gets its result through torchrun's rendezvous store, which
    exists before the process group (whose device and timeout are in the config). A user error on
    rank 0 is raised there and, as SharedError (printed once), on every other rank.
    -> (text, the store: keep it until the process group is up, rank 0 may host it)."""
    rank, world = D.env_int("RANK", 0), D.env_int("WORLD_SIZE", 1)
    if world == 1:
        return produce(), None
    store, _, _ = next(dist.rendezvous("env://", timeout=SHARE_TIMEOUT))
    # a torchrun restart reuses the agent's store: one key space per attempt
    store = dist.PrefixStore(f"vqtok/run_config/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    if rank == 0:
        try:
            text = produce()
        except BaseException as e:
            store.set("error", str(e) if isinstance(e, USER_ERRORS) else
                      f"rank 0 failed while resolving the config ({type(e).__name__})")
            store.set("text", "")
            raise
        store.set("text", text)
        return text, store
    text = store.get("text").decode()
    if not text:
        raise SharedError(store.get("error").decode())
    return text, store


def run_rank(cfg: TrainConfig, run_dir: str, resume: bool) -> str:
    """Body of one rank: join the process group, train, export, leave."""
    from .loop import Trainer
    info = D.setup(cfg.train.device, cfg.train.timeout_s)
    try:
        return Trainer(cfg, run_dir, info, resume=resume).run()
    finally:
        D.teardown()


def rank_main(argv: list[str]) -> str:
    ns = parse_rank_argv(argv)
    world = D.env_int("WORLD_SIZE", 1)
    text, store = share_from_rank0(lambda: rank_config_text(ns, world))   # store: held till return
    cfg = parse_config(text, ns.run_config or run_config_url(ns.out))
    return run_rank(cfg, ns.out, ns.resume)


# ---- one rank process -------------------------------------------------------------------------
PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")


def rank_process(rank_main: Callable[[list[str]], str], argv: list[str], name: str) -> int:
    """The exit status of one rank running `rank_main(argv)` (`python -m pipelines.train` and
    the other trainers' rank entries): user errors and signal stops as one line, not tracebacks."""
    rank = os.environ.get("RANK", "0")
    try:
        rank_main(argv)
    except Stopped as e:
        for sig in STOP_SIGNALS:   # the checkpoint is saved: a late signal must not kill the exit
            signal.signal(sig, signal.SIG_IGN)
        if rank == "0":
            print(f"[{name}] {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except USER_ERRORS as e:
        # a decision shared by all ranks is printed once (by rank 0)
        if not isinstance(e, SharedError) or rank == "0":
            print(f"Error: {e}", file=sys.stderr, flush=True)
            said = os.environ.get(ERROR_SAID_ENV)
            if said:              # tell the launcher the job's error line is printed
                with open(said, "a"):
                    pass
        return RANK_USER_ERROR_EXIT
    except RuntimeError as e:
        # a collective broke because another rank died: that rank reports the cause; here one
        # line instead of a traceback through DDP internals
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, getattr(dist, "DistError", ())) or any(s in message for s in PEER_SIGNS):
            print(f"[rank {rank}] stopped: a collective failed, probably because a peer rank "
                  f"failed ({message[:200]})", file=sys.stderr, flush=True)
            return RANK_PEER_FAILED_EXIT
        raise
    return 0


# ---- the launcher -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What the launcher needs of a trainer. Its arguments (TrainArgs, or the other trainer's)
    carry out, resume and the topology: nproc_per_node, nnodes, node_rank, master_addr,
    master_port."""
    name: str                                   # in messages: "vqtok train"
    module: str                                 # the rank entry torchrun runs: python -m MODULE
    prepare: Callable[[object, int, bool], tuple[object, str | None]]   # (args, world, record) -> (config, text)
    run_rank: Callable[[object, str, bool], str]                         # (config, out, resume) -> final


def torchrun_argv(a, module: str = "pipelines.train") -> list[str]:
    argv = ["--nproc-per-node", str(a.nproc_per_node), "--nnodes", str(a.nnodes), "--max-restarts", "0"]
    if a.nnodes == 1:
        argv += ["--standalone"]
    else:
        argv += ["--node-rank", str(a.node_rank), "--master-addr", a.master_addr,
                 "--master-port", str(a.master_port)]
    # the ranks read what node 0's launcher recorded (global rank 0 reads, the rest get its text)
    rank = ["--out", a.out, "--run-config", run_config_url(a.out)] + (["--resume"] if a.resume else [])
    return argv + ["-m", module] + rank


def run_forwarding_signals(cmd: list[str], env: dict, name: str = "vqtok train") -> int:
    """Run torchrun in its own session and pass it the first SIGTERM/SIGINT we get, once: its
    agent hands it to the ranks, which checkpoint and exit. (In our process group, a Ctrl-C would
    reach the agent twice, and a second signal cuts short the agent's wait for the ranks.)"""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    forwarded = []

    def forward(signum, frame):
        if not forwarded:
            forwarded.append(signum)
            proc.send_signal(signum)
            print(f"[{name}] {signal.Signals(signum).name}: the ranks stop after the next step and "
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


TRAIN = Stage("vqtok train", "pipelines.train", prepare_run, run_rank)


def launch(a, stage: Stage = TRAIN) -> str | None:
    if a.nproc_per_node < 1 or a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        raise UserError(f"need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes "
                        f"(got {a.nproc_per_node}, {a.nnodes}, {a.node_rank})")
    world = a.nproc_per_node * a.nnodes
    # every node checks its own options; node 0 records the run's config
    cfg, _ = stage.prepare(a, world, a.node_rank == 0)
    if world == 1:
        return stage.run_rank(cfg, a.out, a.resume)
    cmd = [sys.executable, "-m", "pipelines.train.torchrun"] + torchrun_argv(a, stage.module)
    env = {"PYTHONUNBUFFERED": "1", **os.environ}
    # torchrun would force 1 thread per rank (with a warning); share this node's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.nproc_per_node)))
    rc = run_forwarding_signals(cmd, env, stage.name)
    if rc != 0:
        raise Reported(rc)    # the failing rank already printed its one-line error
    return f"{a.out.rstrip('/')}/final"
