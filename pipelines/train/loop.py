"""The DDP training loop: one process per rank, lock-step steps, rank 0 writes everything."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm import tqdm

from tokenizer import VQVAE, CheckpointError, ConfigError, VQVAEConfig
from tokenizer.checkpoint import weights_sha256

from .. import distributed as D
from ..config import to_dict
from ..shards.urls import expand_urls
from ..errors import SharedError, Stopped
from ..metrics import psnr_of_mean_mse
from ..parallelize import parallelize
from .checkpoint import (checkpoint_to_resume, load_checkpoint, resume_data_positions, rng_state,
                         same_data_layout, save_checkpoint, set_rng_state)
from .config import TrainConfig
from .augment import augment, augment_generator
from .data import ShardStream, data_workers, load_images, make_loader, usable_cores
from .metrics import MetricsLog, save_grid, validation_record
from .stop import StopSignals


def lr_lambda(cfg: TrainConfig):
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def same_model_config(recorded: dict, model: VQVAEConfig) -> bool:
    """A checkpoint's recorded model config equals `model`, its omitted keys at their defaults
    (a checkpoint written before a key existed)."""
    try:
        return VQVAEConfig.from_dict(recorded) == model       # dataclass equality, nested too
    except (ConfigError, TypeError):
        return False


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str, info: D.DistInfo, resume: bool = False):
        self.cfg, self.run_dir, self.info = cfg, run_dir.rstrip("/"), info
        if cfg.data.batch_size % info.world_size:
            raise SharedError(f"data.batch_size = {cfg.data.batch_size} (global) is not divisible by "
                              f"the {info.world_size} ranks")
        self.local_batch = cfg.data.batch_size // info.world_size
        # resolved once; checkpoints record the number, so a resume compares like with like
        self.num_workers = data_workers(cfg.data.num_workers, info.device.type, info.local_world_size,
                                        usable_cores())
        if info.is_main and cfg.data.num_workers == "auto":
            print(f"data.num_workers = auto: {self.num_workers} per rank ({info.local_world_size} "
                  f"{info.device.type} rank(s) on {usable_cores()} usable CPU core(s))", flush=True)
        self.bf16 = cfg.train.bf16 and D.native_bf16(info.device)
        if info.is_main and info.device.type == "cpu":
            print(f"train.bf16 = {cfg.train.bf16}: the encoder and decoder train in "
                  f"{'bf16 autocast (this CPU has bf16 instructions)' if self.bf16 else 'fp32'}", flush=True)
        self.train_urls = expand_urls(cfg.data.train)
        self.val_urls = expand_urls(cfg.data.val) if cfg.data.val else []
        torch.manual_seed(cfg.train.seed)                      # same init on every rank
        self.model = VQVAE(cfg.model, collectives=D.quantizer_collectives())
        self.ddp = parallelize(self.model, info)
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                     weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        self.rng_at_resume: dict | None = None
        self.positions: dict[int, tuple[int, int]] = {}
        self.bad: dict[int, int] = {}
        self.damaged: dict[int, int] = {}      # damaged shard reads, per data worker
        # per-rank stream for the quantiser's random choices; a checkpoint restores it
        torch.manual_seed(cfg.train.seed + 1000 * info.rank)
        self._resume(resume)
        self.log = MetricsLog(self.run_dir) if info.is_main else None
        self.val_images = None

    # ---- resume -------------------------------------------------------------------------------
    def _resume(self, resume: bool) -> None:
        url = checkpoint_to_resume(self.run_dir, resume, self.info.is_main)
        if url is not None:
            self._load(url)

    def _load(self, url: str) -> None:
        state = load_checkpoint(url)
        if state.get("model_config") and not same_model_config(state["model_config"], self.cfg.model):
            raise SharedError(f"{url}: the checkpoint's model config differs from this run's; "
                              "resume with the same model section")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{url}: {str(e).splitlines()[0]}") from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        per_rank = state.get("ranks", [])
        if len(per_rank) == self.info.world_size:
            # set once the data loader exists (run): making its iterator draws from the global
            # RNG, which the unbroken run did before the checkpoint
            self.rng_at_resume = per_rank[self.info.rank]["rng"]
        workers = self.num_workers
        self.positions, note = resume_data_positions(per_rank, self.info.rank, self.info.world_size, workers)
        if same_data_layout(per_rank, self.info.world_size, workers):
            mine = per_rank[self.info.rank]
            self.bad = {int(w): int(b) for w, b in mine["bad"].items()}
            self.damaged = {int(w): int(b) for w, b in mine.get("damaged", {}).items()}
        if self.info.is_main:
            print(f"resumed from {url} at step {self.step}{note}", flush=True)

    def checkpoint(self) -> None:
        mine = {"rng": rng_state(), "num_workers": self.num_workers,
                "positions": {str(w): list(p) for w, p in self.positions.items()},
                "bad": {str(w): b for w, b in self.bad.items()},
                "damaged": {str(w): b for w, b in self.damaged.items()}}
        # codebook, EMA buffers (and projections) of this replica
        mine["codebook_sha256"] = weights_sha256(self.model.quantizer.state_dict())
        ranks = D.all_gather_object(mine)
        if len({r["codebook_sha256"] for r in ranks}) > 1:
            # every rank sees the same list, so every rank stops here together
            raise RuntimeError(f"step {self.step}: codebook replicas differ across ranks; the "
                               "quantiser's statistics were not all-reduced identically")
        if self.info.is_main:
            state = {"format": 1, "step": self.step, "model": self.model.state_dict(),
                     "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                     "ranks": ranks, "model_config": to_dict(self.cfg.model), "config": to_dict(self.cfg)}
            save_checkpoint(self.run_dir, self.step, state, self.cfg.train.keep_checkpoints)
        D.barrier()

    # ---- data ---------------------------------------------------------------------------------
    def loader(self):
        c = self.cfg
        stream = ShardStream(self.train_urls, channels=c.model.in_channels, resolution=c.model.resolution,
                             batch_size=self.local_batch, rank=self.info.rank,
                             world_size=self.info.world_size, seed=c.train.seed,
                             shuffle_buffer=c.data.shuffle_buffer, start=self.positions,
                             strict_size=c.data.strict_size)
        return make_loader(stream, self.num_workers)

    # ---- one step -----------------------------------------------------------------------------
    def autocast(self):
        if self.bf16:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        x = images.to(self.info.device, non_blocking=True).float().div_(255)   # (B, C, H, W)
        x = augment(x, self.cfg.data.augment, augment_generator(self.cfg.train.seed, self.info.rank, self.step))
        with self.autocast():
            _, _, losses = self.ddp(x)
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        q = self.model.quantizer.metrics
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(loss.detach())
        out["usage"], out["perplexity"] = float(q["usage"]), float(q["perplexity"])
        return out

    # ---- run ----------------------------------------------------------------------------------
    def run(self) -> str:
        c = self.cfg.train
        if self.step >= c.max_steps:
            return self.finish()
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.info.is_main and c.progress), dynamic_ncols=True)
        sums: dict[str, float] = {}
        count, t0 = 0, time.perf_counter()
        self.ddp.train()
        batches = iter(self.loader())
        if self.rng_at_resume is not None:
            set_rng_state(self.rng_at_resume)
        with StopSignals() as stop:
            for batch in batches:
                self.positions[batch["worker"]] = (batch["epoch"], batch["offset"])
                self.bad[batch["worker"]] = batch["bad"]
                self.damaged[batch["worker"]] = batch["damaged"]
                for k, v in self.train_step(batch["images"]).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                self.step += 1
                bar.update(1)
                last = self.step >= c.max_steps
                if self.step % c.log_every == 0 or last:
                    record = self.log_train(sums, count, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr_of_mean_mse']:.2f}",
                                    usage=f"{record['usage']:.2f}")
                    sums, count, t0 = {}, 0, time.perf_counter()
                if self.val_urls and (self.step % c.val_every == 0 or last):
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

    def log_train(self, sums: dict[str, float], count: int, elapsed: float) -> dict:
        keys = sorted(sums)
        t = torch.tensor([sums[k] / count for k in keys] + [float(sum(self.bad.values())),
                                                             float(sum(self.damaged.values()))],
                         dtype=torch.float64, device=self.info.device)
        D.all_reduce_sum(t)
        t[:-2] /= self.info.world_size
        record = {"split": "train", "step": self.step, **dict(zip(keys, t[:-2].tolist()))}
        # PSNR of the interval's mean reconstruction MSE (pipelines/metrics.py); validation
        # records carry the mean over images of each image's PSNR, as `vqtok eval` does
        record["psnr_of_mean_mse"] = psnr_of_mean_mse(record["reconstruction"])
        record["images_per_s"] = count * self.cfg.data.batch_size / max(elapsed, 1e-9)
        record["lr"] = self.sched.get_last_lr()[0]
        record["skipped_samples"] = int(t[-2])
        record["damaged_shards"] = int(t[-1])     # damaged shard reads so far (each epoch counts)
        if self.log:
            self.log.write(record)
        return record

    @torch.no_grad()
    def validate(self) -> None:
        """Rank 0 only: encode/decode involve no collectives, so the others simply go on."""
        if not self.info.is_main:
            return
        m = self.cfg.model
        if self.val_images is None:
            self.val_images = load_images(self.val_urls, m.in_channels, m.resolution, self.cfg.data.val_samples,
                                          strict_size=self.cfg.data.strict_size)
        self.model.eval()
        x = self.val_images.to(self.info.device).float() / 255
        codes = torch.cat([self.model.encode(b) for b in x.split(256)])
        recon = torch.cat([self.model.decode(b) for b in codes.split(256)])
        self.model.train()
        self.log.write({"split": "val", "step": self.step,
                        **validation_record(x, recon, codes, self.model.codebook_size)})
        save_grid(f"{self.run_dir}/val/step-{self.step:08d}.png", x[:16].cpu(), recon[:16].cpu())

    def finish(self) -> str:
        final = f"{self.run_dir}/final"
        if self.info.is_main:
            self.model.save_pretrained(final)
            if self.log:
                self.log.close()
        D.barrier()
        return final
