"""User-facing errors and exit statuses: the one place the CLI and the training ranks take them from.

A user mistake is printed as one line (`Error: ...`), never as a traceback. `tokenizer/` cannot
import pipelines, so its ConfigError and CheckpointError live there and are re-exported here.

Exit statuses of `vqtok` and of a training rank (`python -m pipelines.train`):
  0                          success
  ERROR_EXIT (1)             a user mistake, or a failure already reported on one line
  RANK_USER_ERROR_EXIT (3)   a rank printed its one-line error (pipelines.train.torchrun -> 1)
  RANK_PEER_FAILED_EXIT (4)  a rank's collective broke because another rank failed
  128 + signal               training stopped on SIGTERM (143) / SIGINT (130) after a checkpoint
"""
import signal

from tokenizer import CheckpointError, ConfigError

ERROR_EXIT = 1               # click's status for a ClickException, which the CLI raises for these
RANK_USER_ERROR_EXIT = 3
RANK_PEER_FAILED_EXIT = 4
# names a file a rank creates once it printed the job's one-line user error: whichever rank's
# exit torchrun sees first (a peer may die of the broken collective, even by SIGABRT, before the
# failing rank exits), the launcher then adds no line of its own (pipelines/train/torchrun.py)
ERROR_SAID_ENV = "VQTOK_RANK_ERROR_SAID"


class UserError(Exception):
    """A mistake in what the user gave (a path, a key, a value); the message says which and why."""


class SharedError(UserError):
    """A user error decided on rank 0 and raised identically on every rank (printed once)."""


class Reported(Exception):
    """A failure whose one-line explanation was already printed (by a training rank or torchrun):
    the CLI only exits with `exit_code`."""

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__(f"exit status {exit_code}")


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, step: int, run_dir: str):
        self.signum, self.step = signum, step
        self.exit_code = stopped_exit(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint "
                         f"of that step is in {run_dir}/checkpoints; run the same command with --resume "
                         "to continue")


def stopped_exit(signum: int) -> int:
    return 128 + int(signum)


def first_few(items, limit: int = 5) -> str:
    """'a, b, c and 7 more': the first `limit` items of a list for a one-line message."""
    items = [str(i) for i in items]
    named = ", ".join(items[:limit])
    return named + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if none), for a
    one-line error that wraps another library's multi-line one."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# what the CLI and a training rank print as one line
USER_ERRORS = (UserError, ConfigError, CheckpointError)

__all__ = ["UserError", "SharedError", "Reported", "Stopped", "ConfigError", "CheckpointError", "ERROR_SAID_ENV",
           "USER_ERRORS", "ERROR_EXIT", "RANK_USER_ERROR_EXIT", "RANK_PEER_FAILED_EXIT",
           "stopped_exit", "first_few", "first_line"]
