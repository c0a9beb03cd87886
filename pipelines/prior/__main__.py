"""`torchrun ... -m pipelines.prior ARGS`: one prior training rank (what `vqtok prior train`
launches for several ranks)."""
import sys

from ..distributed import exit_rank
from ..train.launch import rank_process
from .launch import rank_main


def main() -> int:
    return rank_process(rank_main, sys.argv[1:], "vqtok prior train")


if __name__ == "__main__":
    exit_rank(main())      # an exception still propagates (traceback, exit status 1)
