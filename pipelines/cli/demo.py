"""`vqtok demo`: the whole pipeline on real Fashion-MNIST, end to end, on this machine."""
from __future__ import annotations

import click


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, help="Where everything is written.")
@click.option("--steps", default=1200, show_default=True, type=int, help="DDP training steps (short run).")
@click.option("--nproc", default=2, show_default=True, type=int, help="Training processes.")
@click.option("--source", default="/usr/share/datasets/fashion-mnist", show_default=True,
              help="Folder with the Fashion-MNIST IDX files.")
@click.option("--config", default=None, help="Training config (default: configs/fashion_mnist.yaml).")
@click.option("--limit", default=0, show_default=True, type=click.IntRange(min=0),
              help="Images per split (0 = all 70,000): a quick run.")
@click.option("--prior-steps", default=1000, show_default=True, type=click.IntRange(min=0),
              help="DDP steps of the prior over the codes.")
def command(out, steps, nproc, source, config, limit, prior_steps):
    """Prepare Fashion-MNIST shards, train with DDP, tokenize with Ray, evaluate, decode, then
    train, evaluate and sample a prior over the codes."""
    from ..demo import DemoOptions, run_demo
    opts = DemoOptions(out=out, steps=steps, nproc=nproc, source=source, limit=limit,
                       prior_steps=prior_steps)
    if config:
        opts.config = config
    run_demo(opts)
