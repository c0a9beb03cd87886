"""`vqtok prior train`: resolve and check the config once (including what comes from the codes:
the number of classes), record it, then train in this process or under torchrun, through the
launcher `vqtok train` uses (pipelines/train/launch.py, Stage PRIOR)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .. import distributed as D
from ..errors import ConfigError, UserError
from ..readers import CodesDataset
from ..train.config import parse_config, read_config_text, record_run_config, run_config_url
from ..train.launch import Stage, launch, share_from_rank0
from .config import RESUMABLE_KEYS, PriorTrainConfig, resolve_prior_config
from .data import label_classes


@dataclass
class PriorArgs:
    """What `vqtok prior train` (or `python -m pipelines.prior` without --run-config) was given."""
    config: str | None
    codes: str | None
    out: str
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_steps: int | None = None
    batch_size: int | None = None
    resume: bool = False
    sets: list[str] = field(default_factory=list)

    def resolve(self) -> PriorTrainConfig:
        return resolve_prior_config(self.config, self.sets, codes=self.codes, max_steps=self.max_steps,
                                    batch_size=self.batch_size)


def preflight(cfg: PriorTrainConfig, world: int) -> PriorTrainConfig:
    """User mistakes caught before any rank starts (unreadable codes, held-out codes of another
    tokenizer, labels, a batch the ranks cannot share, too few rows), and model.num_classes
    resolved from the codes. -> the config the ranks train with."""
    d = cfg.data
    if d.batch_size % world:
        raise ConfigError(f"data.batch_size = {d.batch_size} (global) is not divisible by the {world} ranks")
    train = CodesDataset(d.codes, rank=0, world_size=1, fields=None)
    slots = world * max(1, d.num_workers)
    if train.num_rows < slots:
        raise UserError(f"{d.codes}: {train.num_rows} rows for {world} ranks x {max(1, d.num_workers)} data "
                        "workers; every data slot needs rows")
    label = d.label_field if d.label_field and d.label_field in train.fields else None
    classes = label_classes(train, label) if label else 0
    given = cfg.model.num_classes
    if given is not None and given < classes:
        raise ConfigError(f"model.num_classes = {given}, but {d.codes} has class ids up to {classes - 1} "
                          f"in {label!r}")
    if given and not label:
        raise ConfigError(f"model.num_classes = {given}, but {d.codes} has no label column "
                          f"{d.label_field!r} (kept fields: {', '.join(train.fields) or 'none'})")
    if d.val:
        val = CodesDataset(d.val, rank=0, world_size=1, fields=None)
        for name in ("tokenizer_sha256", "codebook_size", "grid"):
            a, b = getattr(train.metadata, name), getattr(val.metadata, name)
            if a != b:
                raise UserError(f"data.val {d.val} has {name} {b!r}, data.codes {d.codes} has {a!r}: "
                                "held-out codes must come from the tokenizer that made the training codes")
        if label and label not in val.fields:
            raise UserError(f"data.val {d.val}: no {label!r} column; tokenize it with --keep-fields {label}")
    model = dataclasses.replace(cfg.model, num_classes=classes if given is None else given)
    return dataclasses.replace(cfg, model=model)


def prepare_prior_run(a: PriorArgs, world: int, record: bool = True) -> tuple[PriorTrainConfig, str | None]:
    """The one resolution of a run's config: YAML + --set + flags + the codes, checked, and
    (where `record`) written to RUN_DIR/config.yaml. -> (config, its text)."""
    cfg = preflight(a.resolve(), world)
    text = record_run_config(cfg, a.out, a.resume, RESUMABLE_KEYS) if record else None
    return cfg, text


def run_prior_rank(cfg: PriorTrainConfig, run_dir: str, resume: bool) -> str:
    """Body of one rank: join the process group, train, export, leave."""
    from .loop import PriorTrainer
    info = D.setup(cfg.train.device, cfg.train.timeout_s)
    try:
        return PriorTrainer(cfg, run_dir, info, resume=resume).run()
    finally:
        D.teardown()


PRIOR = Stage("vqtok prior train", "pipelines.prior", prepare_prior_run, run_prior_rank)


def launch_prior(a: PriorArgs) -> str | None:
    return launch(a, PRIOR)


# ---- ranks ------------------------------------------------------------------------------------
def parse_rank_argv(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.prior",
        description="One prior training rank (run it under torchrun or SLURM). Rank 0 resolves the "
                    "config options below once and records them in OUT/config.yaml; every rank "
                    "trains with that text. With --run-config, rank 0 reads a recorded one instead.")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--run-config", help="a config recorded by `vqtok prior train` (OUT/config.yaml); "
                                        "excludes the options after it")
    p.add_argument("--config")
    p.add_argument("--codes")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", dest="sets", action="append", default=[])
    ns = p.parse_args(argv)
    given = [flag for flag, value in (("--config", ns.config), ("--codes", ns.codes), ("--max-steps", ns.max_steps),
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
        parse_config(text, ns.run_config, PriorTrainConfig)      # a broken file is named on rank 0
        return text
    a = PriorArgs(config=ns.config, codes=ns.codes, out=ns.out, max_steps=ns.max_steps,
                  batch_size=ns.batch_size, resume=ns.resume, sets=ns.sets)
    return prepare_prior_run(a, world)[1]


def rank_main(argv: list[str]) -> str:
    ns = parse_rank_argv(argv)
    world = D.env_int("WORLD_SIZE", 1)
    text, store = share_from_rank0(lambda: rank_config_text(ns, world))   # store: held till return
    cfg = parse_config(text, ns.run_config or run_config_url(ns.out), PriorTrainConfig)
    return run_prior_rank(cfg, ns.out, ns.resume)
