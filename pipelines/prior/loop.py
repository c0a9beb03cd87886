"""The prior's DDP training loop: one process per rank, lock-step steps, rank 0 writes.

It runs on the layers `vqtok train` runs on: the launcher and config hand-over
(pipelines/train/launch.py), atomic checkpoints and the resume decision (checkpoint.py), the
SIGTERM/SIGINT agreement (stop.py), metrics.jsonl (metrics.py), the LR schedule and the
DataLoader settings (data.make_loader). What is the prior's own: the model, the code batches,
and the export (pipelines/prior/export.py)."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm import tqdm

from tokenizer import CheckpointError, Prior, PriorConfig
from tokenizer.prior import code_loss

from .. import distributed as D
from ..config import to_dict
from ..errors import SharedError, Stopped
from ..parallelize import parallelize
from ..readers import CodesDataset
from ..train.checkpoint import (checkpoint_to_resume, load_checkpoint, resume_data_positions, rng_state,
                                save_checkpoint, set_rng_state)
from ..train.data import make_loader
from ..train.loop import lr_lambda
from ..train.metrics import MetricsLog
from ..train.stop import StopSignals
from .config import PriorTrainConfig
from .data import CodeBatches
from .evaluate import code_nll
from .export import codes_identity, export_prior, train_stats


def label_of(cfg: PriorTrainConfig) -> str | None:
    """The field the prior is conditioned on (the resolved config says num_classes > 0)."""
    return cfg.data.label_field if cfg.model.num_classes else None


def prior_config(cfg: PriorTrainConfig, dataset: CodesDataset) -> PriorConfig:
    m = cfg.model
    if m.num_classes is None:
        raise SharedError("model.num_classes is unresolved: the launcher resolves it from the codes")
    return PriorConfig(codebook_size=dataset.codebook_size, grid=dataset.grid, num_classes=m.num_classes,
                       d_model=m.d_model, layers=m.layers, heads=m.heads, mlp_ratio=m.mlp_ratio,
                       dropout=m.dropout)


class PriorTrainer:
    def __init__(self, cfg: PriorTrainConfig, run_dir: str, info: D.DistInfo, resume: bool = False):
        self.cfg, self.run_dir, self.info = cfg, run_dir.rstrip("/"), info
        if cfg.data.batch_size % info.world_size:
            raise SharedError(f"data.batch_size = {cfg.data.batch_size} (global) is not divisible by "
                              f"the {info.world_size} ranks")
        self.local_batch = cfg.data.batch_size // info.world_size
        self.label = label_of(cfg)
        self.dataset = CodesDataset(cfg.data.codes, rank=info.rank, world_size=info.world_size, shuffle=True,
                                    seed=cfg.train.seed, fields=(self.label,) if self.label else (),
                                    shuffle_buffer=cfg.data.shuffle_buffer)
        self.prior_config = prior_config(cfg, self.dataset)
        torch.manual_seed(cfg.train.seed)                      # same init on every rank
        self.model = Prior(self.prior_config)
        self.ddp = parallelize(self.model, info)
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                     weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.rng_at_resume: dict | None = None
        self.positions: dict[int, tuple[int, int]] = {}
        self.rotation = 0
        torch.manual_seed(cfg.train.seed + 1000 * info.rank)  # per-rank dropout; a checkpoint restores it
        url = checkpoint_to_resume(self.run_dir, resume, info.is_main)
        if url is not None:
            self._load(url)
        self.log = MetricsLog(self.run_dir) if info.is_main else None
        self.val = None

    # ---- resume -------------------------------------------------------------------------------
    def _load(self, url: str) -> None:
        state = load_checkpoint(url)
        recorded = state.get("model_config")
        if recorded != self.prior_config.to_dict():
            raise SharedError(f"{url}: the checkpoint's prior ({_describe(recorded)}) differs from this "
                              f"run's ({_describe(self.prior_config.to_dict())}); resume with the same "
                              "model section and codes of the same tokenizer")
        trained_on = (state.get("codes") or {}).get("tokenizer_sha256")
        if trained_on != self.dataset.metadata.tokenizer_sha256:
            raise SharedError(f"{url}: the checkpoint was trained on codes of tokenizer {str(trained_on)[:12]}..., "
                              f"{self.cfg.data.codes} holds codes of tokenizer "
                              f"{self.dataset.metadata.tokenizer_sha256[:12]}...; train into another --out")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{url}: {str(e).splitlines()[0]}") from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        per_rank = state.get("ranks", [])
        if len(per_rank) == self.info.world_size:
            self.rng_at_resume = per_rank[self.info.rank]["rng"]   # set once the loader exists
        self.positions, note = resume_data_positions(per_rank, self.info.rank, self.info.world_size,
                                                     self.cfg.data.num_workers)
        # batch n comes from data slot n mod W (data.py): the unbroken run's next batch came from
        # slot step mod W (after a new layout any slot could start; this one keeps the rule)
        self.rotation = self.step % max(1, self.cfg.data.num_workers)
        if self.info.is_main:
            print(f"resumed from {url} at step {self.step}{note}", flush=True)

    def checkpoint(self) -> None:
        mine = {"rng": rng_state(), "num_workers": self.cfg.data.num_workers,
                "positions": {str(s): list(p) for s, p in self.positions.items()}}
        ranks = D.all_gather_object(mine)
        if self.info.is_main:
            state = {"format": 1, "step": self.step, "model": self.model.state_dict(),
                     "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                     "ranks": ranks, "model_config": self.prior_config.to_dict(), "config": to_dict(self.cfg),
                     "codes": codes_identity(self.dataset.metadata)}
            save_checkpoint(self.run_dir, self.step, state, self.cfg.train.keep_checkpoints)
        D.barrier()

    # ---- one step -----------------------------------------------------------------------------
    def autocast(self):
        if self.info.device.type == "cuda" and self.cfg.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> float:
        codes = batch["codes"].to(self.info.device, non_blocking=True)
        cls = batch["cls"].to(self.info.device, non_blocking=True) if self.label else None
        with self.autocast():
            loss = self._loss(codes, cls)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach())

    def _loss(self, codes: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """Prior.loss, but through the DDP wrapper (its forward synchronises the gradients)."""
        seq = self.model.sequence(codes)
        return code_loss(self.ddp(seq[:, :-1], cls), seq)

    # ---- run ----------------------------------------------------------------------------------
    def loader(self):
        stream = CodeBatches(self.dataset, self.local_batch, self.label, start=self.positions,
                             rotation=self.rotation)
        return make_loader(stream, self.cfg.data.num_workers)

    def run(self) -> str:
        c = self.cfg.train
        if self.step >= c.max_steps:
            return self.finish()
        bar = tqdm(total=c.max_steps, initial=self.step, desc="prior", unit="step",
                   disable=not (self.info.is_main and c.progress), dynamic_ncols=True)
        loss_sum, count, t0 = 0.0, 0, time.perf_counter()
        self.ddp.train()
        batches = iter(self.loader())
        if self.rng_at_resume is not None:
            set_rng_state(self.rng_at_resume)
        with StopSignals() as stop:
            for batch in batches:
                self.positions[batch["slot"]] = (batch["epoch"], batch["offset"])
                loss_sum += self.train_step(batch)
                count += 1
                self.step += 1
                bar.update(1)
                last = self.step >= c.max_steps
                if self.step % c.log_every == 0 or last:
                    record = self.log_train(loss_sum, count, time.perf_counter() - t0)
                    bar.set_postfix(bits_per_code=f"{record['bits_per_code']:.3f}")
                    loss_sum, count, t0 = 0.0, 0, time.perf_counter()
                if self.cfg.data.val and (self.step % c.val_every == 0 or last):
                    self.validate()
                signum = None if last else stop.agreed(self.info.device)
                if self.step % c.checkpoint_every == 0 or last or signum:
                    self.checkpoint()
                if last:
                    break
                if signum:
                    bar.close()
                    raise Stopped(signum, self.step, self.run_dir)
        bar.close()
        return self.finish()

    def log_train(self, loss_sum: float, count: int, elapsed: float) -> dict:
        t = torch.tensor([loss_sum / count], dtype=torch.float64, device=self.info.device)
        D.all_reduce_sum(t)
        nats = float(t[0]) / self.info.world_size
        rows_per_s = count * self.cfg.data.batch_size / max(elapsed, 1e-9)
        record = {"split": "train", "step": self.step, "loss": nats, "bits_per_code": nats / math.log(2),
                  "rows_per_s": rows_per_s, "tokens_per_s": rows_per_s * self.prior_config.num_codes,
                  "lr": self.sched.get_last_lr()[0]}
        if self.log:
            self.log.write(record)
        return record

    @torch.no_grad()
    def validate(self) -> None:
        """Rank 0 only (no collectives inside), like `vqtok train`'s validation."""
        if not self.info.is_main:
            return
        if self.val is None:
            self.val = CodesDataset(self.cfg.data.val, rank=0, world_size=1,
                                    fields=(self.label,) if self.label else ())
        result = code_nll(self.model, self.val, self.label, limit=self.cfg.data.val_rows, device=self.info.device)
        self.model.train()
        self.log.write({"split": "val", "step": self.step, "bits_per_code": result.bits_per_code,
                        "rows": result.rows})

    def finish(self) -> str:
        """Rank 0 exports RUN/final: the prior, the training codes' histogram and grid hashes,
        and the training rows' bits per code (the other half of eval's train-test gap)."""
        final = f"{self.run_dir}/final"
        if self.info.is_main:
            train = CodesDataset(self.cfg.data.codes, rank=0, world_size=1,
                                 fields=(self.label,) if self.label else ())
            fit = code_nll(self.model, train, self.label, limit=self.cfg.data.eval_rows, device=self.info.device)
            export_prior(final, self.model, train_stats(train), train.metadata, {
                "label_field": self.label or "", "train_codes": self.cfg.data.codes, "step": self.step,
                "train_bits_per_code": fit.bits_per_code, "train_eval_rows": fit.rows,
                "config": to_dict(self.cfg)})
            if self.log:
                self.log.close()
        D.barrier()
        return final


def _describe(config: dict | None) -> str:
    if not isinstance(config, dict):
        return "unknown"
    return ", ".join(f"{k} {config.get(k)}" for k in ("codebook_size", "grid", "num_classes", "d_model", "layers"))
