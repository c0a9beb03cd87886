"""`torchrun ... -m pipelines.train ARGS`: one training rank (also what `vqtok train` launches)."""
import sys

from ..distributed import exit_rank
from .launch import rank_main, rank_process


def main() -> int:
    return rank_process(rank_main, sys.argv[1:], "vqtok train")


if __name__ == "__main__":
    exit_rank(main())      # an exception still propagates (traceback, exit status 1)
