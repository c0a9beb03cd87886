"""The `vqtok` command: one click group, one thin module per subcommand (loaded lazily)."""
from __future__ import annotations

import importlib
import os
import sys

import click

from tokenizer import __version__

from ..errors import USER_ERRORS, Reported, Stopped

# name -> module under pipelines.cli that defines `command`
SUBCOMMANDS = {
    "prepare": "prepare",
    "train": "train",
    "tokenize": "tokenize",
    "submit": "submit",
    "decode": "decode",
    "eval": "evaluate",
    "inspect": "inspect",
    "verify": "verify",
    "prior": "prior",
    "demo": "demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in SUBCOMMANDS if self._load(name) is not None]

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        module_name = SUBCOMMANDS.get(name)
        if module_name is None:
            return None
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module_name}":
                return None
            raise
        return module.command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        except Stopped as e:       # a signal stopped training after a checkpoint: not an error
            click.echo(f"[vqtok {ctx.invoked_subcommand}] {e}", err=True)
            ctx.exit(e.exit_code)
        except Reported as e:      # the failing process already printed its one line
            ctx.exit(e.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vqtok")
def main():
    """vqtok: train a VQ-VAE image tokenizer with DDP and turn image datasets into discrete codes
    (Parquet) with Ray."""
    quiet_progress_in_logs()


def quiet_progress_in_logs() -> None:
    """Progress bars redraw many times a second; in a log file (a Ray job, SLURM, CI) that is
    megabytes of carriage returns, so off a terminal they update every 30 s (tqdm reads
    TQDM_MININTERVAL; the training ranks inherit it). A user's own setting wins."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


if __name__ == "__main__":
    sys.exit(main())
