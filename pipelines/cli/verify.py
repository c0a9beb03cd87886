"""`vqtok verify`: prove a tokenize output whole (see pipelines/verify.py for the checks)."""
import json

import click


@click.command("verify")
@click.argument("output")
@click.option("--input", "inputs", multiple=True,
              help="The job's --input URL(s): every input shard must have been tokenized. Repeatable.")
@click.option("--unique-keys", is_flag=True,
              help="Also require keys unique across shards (holds every key in memory).")
@click.option("--threads", default=8, show_default=True, type=int, help="Files checked at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def command(ctx, output, inputs, unique_keys, threads, as_json):
    """Check every file of OUTPUT against its manifest: present, readable, rows, checksum, codes in
    [0, K), unique keys, one tokenizer; no committed shard gone since _SUCCESS, no other file that
    readers would read. Exit status 1 on any finding, 0 on a whole output."""
    from ..verify import format_report, verify_output

    report = verify_output(output, list(inputs), threads=threads, unique_keys=unique_keys)
    click.echo(json.dumps(report) if as_json else format_report(report))
    if not report["ok"]:
        ctx.exit(1)
