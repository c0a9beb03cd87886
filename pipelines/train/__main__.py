"""`torchrun ... -m pipelines.train ARGS`: one training rank (also what `vqtok train` launches)."""
import os
import sys

from .launch import USER_ERROR_EXIT, USER_ERRORS, parse_rank_argv, run_rank
from .loop import SharedError


def main() -> int:
    args = parse_rank_argv(sys.argv[1:])
    try:
        run_rank(args)
    except USER_ERRORS as e:
        # a decision shared by all ranks is printed once (by rank 0)
        if not isinstance(e, SharedError) or os.environ.get("RANK", "0") == "0":
            print(f"Error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
