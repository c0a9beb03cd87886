"""`vqtok prior`: an autoregressive prior over the codes: train (DDP), eval, sample."""
from __future__ import annotations

import json

import click


@click.group("prior")
def command():
    """Train, evaluate and sample a prior over a tokenize output's codes."""


@command.command("train")
@click.option("--codes", default=None, help="The `vqtok tokenize` output to train on (sets data.codes).")
@click.option("--out", required=True, help="Run directory (checkpoints, metrics.jsonl, final/).")
@click.option("--config", "config", default=None, help="YAML config (configs/prior_cpu.yaml, configs/prior_gpu.yaml).")
@click.option("--nproc-per-node", default=1, show_default=True, type=int, help="Ranks on this node.")
@click.option("--nnodes", default=1, show_default=True, type=int)
@click.option("--node-rank", default=0, show_default=True, type=int)
@click.option("--master-addr", default="127.0.0.1", show_default=True)
@click.option("--master-port", default=29500, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Overrides train.max_steps.")
@click.option("--batch-size", default=None, type=int, help="Global batch size in rows (overrides data.batch_size).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--set", "sets", multiple=True, help="Override a config value: section.key=value.")
def train(codes, out, config, nproc_per_node, nnodes, node_rank, master_addr, master_port, max_steps,
          batch_size, resume, sets):
    """Train a causal transformer over the codes in raster order (class-conditional when the
    codes kept a label field); the prior is exported to OUT/final/."""
    from ..prior import PriorArgs, launch_prior
    final = launch_prior(PriorArgs(config=config, codes=codes, out=out, nproc_per_node=nproc_per_node,
                                   nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                   master_port=master_port, max_steps=max_steps, batch_size=batch_size,
                                   resume=resume, sets=list(sets)))
    if final and node_rank == 0:
        click.echo(f"prior exported to {final}")


@command.command("eval")
@click.option("--prior", required=True, help="A prior directory (RUN/final).")
@click.option("--codes", required=True, help="Held-out `vqtok tokenize` output of the same tokenizer.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N rows (and images).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--tokenizer", default=None, help="With --images: the tokenizer, for bits_per_dim's reconstruction term.")
@click.option("--images", multiple=True, help="The held-out shards the codes were made from (repeatable).")
def evaluate(prior, codes, limit, batch_size, tokenizer, images):
    """Held-out bits per code against the unigram and uniform baselines, as one JSON line."""
    from ..prior.evaluate import evaluate_prior
    result = evaluate_prior(prior, codes, limit=limit, batch_size=batch_size, tokenizer=tokenizer,
                            images=list(images) or None)
    click.echo(json.dumps(result))


@command.command("sample")
@click.option("--prior", required=True, help="A prior directory (RUN/final).")
@click.option("--tokenizer", required=True, help="The tokenizer that made the prior's training codes.")
@click.option("--out", required=True, help="Directory for the sampled codes (a vqtok output) and _samples.png.")
@click.option("--n", "n", type=int, default=10, show_default=True, help="Samples per class (or in all, unconditional).")
@click.option("--class", "cls", type=int, default=None, help="Only this class.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an OUT made with other settings.")
def sample(prior, tokenizer, out, n, cls, temperature, seed, batch_size, overwrite):
    """Sample code grids, write them as a vqtok output with a decoded PNG grid (a row per class),
    and report the share of samples that copy a training grid."""
    from ..prior.sample import sample_prior
    click.echo(json.dumps(sample_prior(prior, tokenizer, out, n, cls=cls, temperature=temperature, seed=seed,
                                       batch_size=batch_size, overwrite=overwrite)))
