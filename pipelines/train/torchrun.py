"""torchrun (torch.distributed.run) with a one-line failure report instead of a traceback.

A rank that hit a user mistake prints `Error: ...` itself and exits RANK_USER_ERROR_EXIT; the elastic
agent then stops the other local ranks (fail-fast, --max-restarts 0). On SIGTERM/SIGINT the agent
passes the signal to the ranks, which save a checkpoint, print where, and exit 128 + signal."""
from __future__ import annotations

import logging
import os
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from ..errors import ERROR_EXIT, ERROR_SAID_ENV, RANK_PEER_FAILED_EXIT, RANK_USER_ERROR_EXIT, stopped_exit
from .stop import STOP_SIGNALS



def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="vqtok-train-") as tmp:
        said = os.path.join(tmp, "error-said")
        os.environ[ERROR_SAID_ENV] = said            # inherited by the ranks
        return _run(argv)


def _run(argv: list[str]) -> int:
    try:
        torchrun_main(argv)
    except SignalException as e:
        return stopped_exit(e.sigval)     # the ranks stopped after a checkpoint and said so
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if RANK_USER_ERROR_EXIT in codes:
            return ERROR_EXIT      # the rank printed its one-line error
        stopped = codes & {stopped_exit(sig) for sig in STOP_SIGNALS}
        # a rank stopped on a signal (after the checkpoint, which every rank passed); the agent
        # then signalled the others, which may die of it while already on their way out
        late = {RANK_PEER_FAILED_EXIT} | {-int(sig) for sig in STOP_SIGNALS}
        if stopped and codes <= stopped | late:
            return max(stopped)
        causes = {r: f for r, f in e.failures.items() if f.exitcode != RANK_PEER_FAILED_EXIT} or e.failures
        rank, failure = min(causes.items(), key=lambda kv: kv[1].timestamp)
        if os.path.exists(os.environ.get(ERROR_SAID_ENV, "")):
            return ERROR_EXIT      # a rank printed the job's error; this one died of it
        how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"Error: training rank {rank} {how}; see its output above", file=sys.stderr)
        return ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
