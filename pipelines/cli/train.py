"""`vqtok train`: DDP training from WebDataset shards (launches torchrun for several ranks)."""
from __future__ import annotations

import click


@click.command("train")
@click.option("--config", "config", default=None, help="YAML config (e.g. configs/fashion_mnist.yaml).")
@click.option("--train-data", multiple=True, required=True, help="Training shards: pattern/URL (repeatable).")
@click.option("--val-data", multiple=True, help="Validation shards (repeatable).")
@click.option("--out", required=True, help="Run directory (checkpoints, metrics.jsonl, val/, final/).")
@click.option("--nproc-per-node", default=1, show_default=True, type=int, help="Ranks on this node.")
@click.option("--nnodes", default=1, show_default=True, type=int, help="Nodes in the job (> 1: run the command on each).")
@click.option("--node-rank", default=0, show_default=True, type=int, help="This node's rank, 0 .. nnodes-1.")
@click.option("--master-addr", default="127.0.0.1", show_default=True, help="Address of node 0 (the rendezvous point).")
@click.option("--master-port", default=29500, show_default=True, type=int, help="Rendezvous port on node 0.")
@click.option("--max-steps", default=None, type=int, help="Overrides train.max_steps.")
@click.option("--batch-size", default=None, type=int, help="Global batch size (overrides data.batch_size).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--set", "sets", multiple=True, help="Override a config value: section.key=value.")
def command(config, train_data, val_data, out, nproc_per_node, nnodes, node_rank, master_addr,
            master_port, max_steps, batch_size, resume, sets):
    """Train the VQ-VAE tokenizer; the result is exported to OUT/final/."""
    from ..train import TrainArgs, launch
    args = TrainArgs(config=config, train_data=list(train_data), val_data=list(val_data), out=out,
                     nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                     master_addr=master_addr, master_port=master_port, max_steps=max_steps,
                     batch_size=batch_size, resume=resume, sets=list(sets))
    final = launch(args)
    if final and node_rank == 0:
        click.echo(f"tokenizer exported to {final}")
