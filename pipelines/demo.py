"""The whole mission on real data in one go: Fashion-MNIST shards -> 2-process DDP training ->
Ray tokenization -> Parquet -> eval report with pictures -> decoded samples."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DemoOptions:
    out: str = "demo_out"
    source: str = "/usr/share/datasets/fashion-mnist"
    config: str = str(REPO_CONFIGS / "fashion_mnist.yaml")
    steps: int = 1200
    nproc: int = 2
    decode_limit: int = 64
    limit: int = 0          # images per split (0 = all 70,000): a quick run, e.g. in CI


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_demo(opts: DemoOptions) -> dict:
    from .decode import decode_output
    from .evaluate import evaluate
    from .inspect_output import inspect_output
    from .prepare.fashion import prepare_fashion_mnist
    from .tokenize import TokenizeConfig, run_tokenize
    from .train import TrainArgs, launch

    if not Path(opts.config).is_file():
        raise UserError(f"{opts.config}: config not found (run the demo from a vqtok checkout, or pass --config)")
    out = Path(opts.out).resolve()
    paths = {name: str(out / name) for name in ("shards", "run", "codes", "report", "decoded")}
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    _say(f"1/5 Fashion-MNIST (real IDX files from {opts.source}) -> WebDataset shards in {paths['shards']}")
    if not list(Path(paths["shards"]).glob("test-*.tar")):
        prepare_fashion_mnist(paths["shards"], source=opts.source, shard_size=5000, limit=opts.limit)
    times["prepare_s"] = time.perf_counter() - t0
    train = [f"{paths['shards']}/train-*.tar"]
    test = [f"{paths['shards']}/test-*.tar"]

    _say(f"2/5 DDP training: {opts.nproc} processes (torchrun, gloo on CPU), {opts.steps} steps -> {paths['run']}")
    t = time.perf_counter()
    final = launch(TrainArgs(config=opts.config, train_data=train, val_data=test, out=paths["run"],
                             nproc_per_node=opts.nproc, max_steps=opts.steps, resume=True,
                             sets=["train.val_every=1000000", f"train.checkpoint_every={max(opts.steps // 2, 1)}"]))
    times["train_s"] = time.perf_counter() - t

    _say(f"3/5 Ray tokenization of every image -> Parquet in {paths['codes']}")
    t = time.perf_counter()
    summary = run_tokenize(TokenizeConfig(tokenizer=final, inputs=train + test, output=paths["codes"],
                                          keep_fields=["cls"], overwrite=True))
    times["tokenize_s"] = time.perf_counter() - t

    _say(f"4/5 evaluation on the test images -> {paths['report']}")
    t = time.perf_counter()
    report = evaluate(final, test, paths["report"])
    times["eval_s"] = time.perf_counter() - t

    _say(f"5/5 decoding {opts.decode_limit} code grids back to PNGs -> {paths['decoded']}")
    t = time.perf_counter()
    decode_output(final, paths["codes"], paths["decoded"], limit=opts.decode_limit)
    times["decode_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    info = inspect_output(paths["codes"])
    result = {"paths": {**paths, "tokenizer": final}, "eval": report.to_dict(),
              "tokenize": {k: summary[k] for k in ("shards", "done", "error_rate", "samples_per_s") if k in summary},
              "rows": info.get("rows"), "times": {k: round(v, 1) for k, v in times.items()}}
    _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    p = result["paths"]
    print(
        "\nvqtok demo finished in {total:.0f}s\n"
        "  tokenizer        {tokenizer}   (config.json + model.safetensors)\n"
        "  training run     {run}   (metrics.jsonl, val/*.png, checkpoints/)\n"
        "  codes (Parquet)  {codes}   ({rows} rows; _manifest/, _errors/, _SUCCESS)\n"
        "  eval report      {report}   (PNG grid of originals vs reconstructions, code-usage histogram)\n"
        "  decoded samples  {decoded}\n"
        "  eval             {eval}\n"
        "Next: vqtok inspect {codes} ; python examples/train_prior.py --codes {codes} --tokenizer {tokenizer}"
        .format(total=result["times"]["total_s"], rows=result["rows"],
                eval=json.dumps({k: v for k, v in result["eval"].items() if k != "files"}), **p),
        flush=True)
