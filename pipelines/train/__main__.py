"""`torchrun ... -m pipelines.train ARGS`: one training rank (also what `vqtok train` launches)."""
import os
import signal
import sys

import torch.distributed as dist

from ..distributed import exit_rank
from ..errors import RANK_PEER_FAILED_EXIT, RANK_USER_ERROR_EXIT, USER_ERRORS, SharedError, Stopped
from .launch import rank_main
from .torchrun import ERROR_SAID_ENV
from .stop import STOP_SIGNALS

PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")


def main() -> int:
    rank = os.environ.get("RANK", "0")
    try:
        rank_main(sys.argv[1:])
    except Stopped as e:
        for sig in STOP_SIGNALS:   # the checkpoint is saved: a late signal must not kill the exit
            signal.signal(sig, signal.SIG_IGN)
        if rank == "0":
            print(f"[vqtok train] {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except USER_ERRORS as e:
        # a decision shared by all ranks is printed once (by rank 0)
        if not isinstance(e, SharedError) or rank == "0":
            print(f"Error: {e}", file=sys.stderr, flush=True)
            said = os.environ.get(ERROR_SAID_ENV)
            if said:              # tell `vqtok train`'s launcher the job's error line is printed
                with open(said, "a"):
                    pass
        return RANK_USER_ERROR_EXIT
    except RuntimeError as e:
        # a collective broke because another rank died: that rank reports the cause; here one
        # line instead of a traceback through DDP internals
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, getattr(dist, "DistError", ())) or any(s in message for s in PEER_SIGNS):
            print(f"[rank {rank}] stopped: a collective failed, probably because a peer rank "
                  f"failed ({message[:200]})", file=sys.stderr, flush=True)
            return RANK_PEER_FAILED_EXIT
        raise
    return 0


if __name__ == "__main__":
    exit_rank(main())      # an exception still propagates (traceback, exit status 1)
