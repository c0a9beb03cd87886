"""Pack the training benchmark's source pictures small enough to travel to another machine (the
device machine of a GPU sweep, which has no Debian packages and no network):

  python benchmarks/bench_assets.py .bench        # here: writes .bench/root/<absolute paths>
  cp -r .bench/root/. /                           # there (as root): the same paths, smaller files

Each picture train_quality.py reads (the largest file of every wallpaper directory, every held-out
photograph) is decoded by the image policy, its shorter side scaled to 256 exactly as
`vqtok prepare folder --short-side 256` scales it, and saved losslessly as PNG under its own path
and name. There `prepare` finds the same files in the same order, and its scaling to 256 is then
an identity (Pillow returns a copy at the same size), so the crops are the ones made here.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHORT_SIDE = 256


def sources() -> list[str]:
    from pipelines.prepare.folder import list_images
    from train_quality import PHOTO_SETS, WALLPAPERS
    files = list_images(WALLPAPERS, largest_per_dir=True)
    for paths in PHOTO_SETS.values():
        for p in paths:
            files += [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    return sorted(set(files))


def main() -> None:
    from pipelines.prepare.folder import FolderOptions, open_image, scale_short_side
    out = os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".bench", "root")
    opts = FolderOptions(size=32, crops_per_image=1, short_side=SHORT_SIDE)
    total = 0
    for path in sources():
        img = scale_short_side(open_image(path, opts), SHORT_SIDE)
        dst = out + path
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        img.save(dst, format="PNG", optimize=False)
        total += os.path.getsize(dst)
    print(f"{len(sources())} pictures, {total / 2**20:.1f} MiB under {out}")


if __name__ == "__main__":
    main()
