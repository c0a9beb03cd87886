"""`vqtok prepare`: datasets -> WebDataset shards."""
from __future__ import annotations

import click


@click.group("prepare")
def command():
    """Turn a dataset into WebDataset shards (one .png per sample)."""


@command.command("fashion-mnist")
@click.option("--out", required=True, help="Output directory or URL for the shards.")
@click.option("--source", default=None, help="Directory holding the IDX files "
              "[default: /usr/share/datasets/fashion-mnist].")
@click.option("--shard-size", default=5000, show_default=True, type=click.IntRange(min=1), help="Samples per shard.")
@click.option("--limit", default=0, type=click.IntRange(min=0), help="Keep only the first N samples per split.")
def fashion_mnist(out, source, shard_size, limit):
    """Fashion-MNIST IDX files -> train-%06d.tar and test-%06d.tar (.png + .cls)."""
    from ..prepare import DEFAULT_SOURCE, prepare_fashion_mnist
    written = prepare_fashion_mnist(out, source or DEFAULT_SOURCE, shard_size, limit=limit)
    for split, shards in written.items():
        click.echo(f"{split}: {len(shards)} shards in {out}")


@command.command("folder")
@click.argument("src")
@click.option("--out", required=True, help="Output directory or URL for the shards.")
@click.option("--size", default=32, show_default=True, type=int, help="Side S of the SxS outputs.")
@click.option("--crops-per-image", default=0, show_default=True, type=int,
              help="Random SxS crops per image; 0 = one centre-cropped, resized image.")
@click.option("--short-side", default=0, show_default=True, type=int,
              help="First scale each image's shorter side to this many pixels (0 = keep).")
@click.option("--largest-per-dir", is_flag=True, help="Use only the largest image file under each top-level directory of SRC.")
@click.option("--holdout", default=0, show_default=True, type=int,
              help="Source images written to holdout-%06d.tar instead (held-out evaluation).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the file order, crops and holdout choice.")
@click.option("--shard-size", default=5000, show_default=True, type=int, help="Samples per shard.")
def folder(src, out, size, crops_per_image, short_side, largest_per_dir, holdout, seed, shard_size):
    """A folder tree of images -> images-%06d.tar of SxS PNGs. Unreadable files are reported and skipped."""
    from ..prepare import FolderOptions, prepare_folder
    opts = FolderOptions(size=size, crops_per_image=crops_per_image, short_side=short_side,
                         largest_per_dir=largest_per_dir, holdout=holdout, seed=seed,
                         shard_size=shard_size)
    result = prepare_folder(src, out, opts)
    click.echo(f"images: {result['counts']['images']} samples in {len(result['images'])} shards; "
               f"holdout: {result['counts']['holdout']} samples in {len(result['holdout'])} shards; "
               f"skipped {len(result['skipped'])} unreadable file(s)")
