"""`vqtok submit --address http://HEAD:8265 [--wait] -- tokenize ...`: run it as a Ray job."""
from __future__ import annotations

import sys

import click


@click.command("submit", context_settings={"ignore_unknown_options": True})
@click.option("--address", envvar="RAY_API_SERVER_ADDRESS", required=True,
              help="Ray dashboard/job API address, e.g. http://HEAD:8265 (or RAY_API_SERVER_ADDRESS).")
@click.option("--wait", is_flag=True, help="Stream the job's logs and exit with its status.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(address, wait, args):
    """Submit a vqtok command (after --) to a Ray cluster; prints the job id."""
    from pipelines.submit import submit

    status = submit(address, list(args), wait)
    sys.exit(status)
