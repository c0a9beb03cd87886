"""`vqtok decode`: codes back to PNG images named by key."""
import click


@click.command("decode")
@click.option("--tokenizer", required=True, help="Tokenizer directory or URL the codes were made with.")
@click.option("--codes", required=True, help="A `vqtok tokenize` output directory or URL.")
@click.option("--out", required=True, help="Directory for OUT/<shard>/<key>.png (nothing is written outside it).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Decode only the first N rows.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per model call.")
def command(tokenizer, codes, out, limit, batch_size):
    """Decode the codes of a tokenize output to PNGs (OUT/<shard>/<key>.png, index in
    OUT/_index.jsonl)."""
    from ..decode import decode_output

    summary = decode_output(tokenizer, codes, out, limit=limit, batch_size=batch_size)
    click.echo(f"decoded {summary.images} images to {summary.out} (index: {summary.index})")
