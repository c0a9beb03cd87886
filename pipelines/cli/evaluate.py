"""`vqtok eval`: reconstruction quality and codebook usage, with pictures."""
import click


@click.command("eval")
@click.option("--tokenizer", required=True, help="Tokenizer directory or URL.")
@click.option("--input", "inputs", required=True, multiple=True,
              help="WebDataset shards: URL, brace range or glob (repeatable).")
@click.option("--out", required=True, help="Report directory: reconstructions.png, code_usage.png, metrics.json.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate at most N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per model call.")
def command(tokenizer, inputs, out, limit, batch_size):
    """Encode and decode images; print one JSON line (mean_psnr, usage, perplexity, images) and write
    a PNG grid of originals vs reconstructions and a PNG histogram of code usage."""
    from ..evaluate import evaluate

    report = evaluate(tokenizer, list(inputs), out, limit=limit, batch_size=batch_size)
    click.echo(report.json_line())
