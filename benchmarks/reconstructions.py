"""Reconstructions of several tokenizers side by side (not a test): the same held-out crops, a row
of originals, then one row per tokenizer, through `encode` / `decode`.

  python benchmarks/reconstructions.py --images '/tmp/vqtok-bench/unseen46-heldout-shards/images-*.tar' \
      --out docs/large_codebooks.png RUN_A/final RUN_B/final ...
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tokenizers", nargs="+")
    p.add_argument("--images", required=True, help="shard pattern of the held-out crops")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=12, help="crops, spread evenly over the set")
    a = p.parse_args()
    from pipelines.pictures import image_grid
    from pipelines.shards.urls import expand_urls
    from pipelines.train.data import ShardStream
    from tokenizer import VQVAE
    stream = ShardStream(expand_urls([a.images]), channels=3, resolution=32, batch_size=1 << 30,
                         shuffle_buffer=1, endless=False)
    x = next(iter(stream))["images"].float().div(255)
    x = x[torch.linspace(0, len(x) - 1, a.count).long()]                   # (count, 3, 32, 32)
    rows = [list(x)]
    for path in a.tokenizers:
        model = VQVAE.from_pretrained(path)
        rows.append(list(model.decode(model.encode(x))))
    image_grid(rows).save(a.out)
    print(f"{a.out}: originals, then {', '.join(a.tokenizers)}")


if __name__ == "__main__":
    main()
