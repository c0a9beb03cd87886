"""User-facing errors: the CLI prints these as one line, never as a traceback."""
import signal


class UserError(Exception):
    """A mistake in what the user gave (a path, a key, a value); the message says which and why."""


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, step: int, run_dir: str):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint "
                         f"of that step is in {run_dir}/checkpoints; run the same command with --resume "
                         "to continue")
