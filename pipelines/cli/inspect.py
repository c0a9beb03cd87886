"""`vqtok inspect`: summarise a tokenize output."""
import json

import click


@click.command("inspect")
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def command(output, as_json):
    """Rows, shards done/failed, errors by reason, tokenizer, grid and codebook size of OUTPUT."""
    from ..inspect_output import format_report, inspect_output

    info = inspect_output(output)
    click.echo(json.dumps(info) if as_json else format_report(info))
