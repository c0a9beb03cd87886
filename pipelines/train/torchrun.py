"""torchrun (torch.distributed.run) with a one-line failure report instead of a traceback.

A rank that hit a user mistake prints `Error: ...` itself and exits USER_ERROR_EXIT; the elastic
agent then stops the other local ranks (fail-fast, --max-restarts 0)."""
from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from .launch import USER_ERROR_EXIT


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        if failure.exitcode != USER_ERROR_EXIT:
            how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            print(f"Error: training rank {rank} {how}; see its output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
