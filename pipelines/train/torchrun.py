"""torchrun (torch.distributed.run) with a one-line failure report instead of a traceback.

A rank that hit a user mistake prints `Error: ...` itself and exits USER_ERROR_EXIT; the elastic
agent then stops the other local ranks (fail-fast, --max-restarts 0)."""
from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from .launch import PEER_FAILED_EXIT, USER_ERROR_EXIT


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if USER_ERROR_EXIT in codes:
            return 1      # the rank printed its one-line error
        causes = {r: f for r, f in e.failures.items() if f.exitcode != PEER_FAILED_EXIT} or e.failures
        rank, failure = min(causes.items(), key=lambda kv: kv[1].timestamp)
        how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"Error: training rank {rank} {how}; see its output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
