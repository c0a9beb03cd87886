"""The whole mission on real data in one go: Fashion-MNIST shards -> 2-process DDP training ->
Ray tokenization (train and test splits, two outputs) -> Parquet -> eval report with pictures ->
decoded samples -> a class-conditional prior trained on the train codes (2-process DDP),
evaluated on the test codes, and sampled."""
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
    prior_config: str = str(REPO_CONFIGS / "prior_cpu.yaml")
    prior_steps: int = 1000
    prior_samples: int = 10          # per class


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_demo(opts: DemoOptions) -> dict:
    from .decode import decode_output
    from .evaluate import evaluate
    from .inspect_output import inspect_output
    from .prepare.fashion import prepare_fashion_mnist
    from .prior import PriorArgs, launch_prior
    from .prior.evaluate import evaluate_prior
    from .prior.sample import sample_prior
    from .tokenize import TokenizeConfig, run_tokenize
    from .train import TrainArgs, launch

    for config in (opts.config, opts.prior_config):
        if not Path(config).is_file():
            raise UserError(f"{config}: config not found (run the demo from a vqtok checkout, or pass --config)")
    out = Path(opts.out).resolve()
    paths = {name: str(out / name) for name in ("shards", "run", "codes", "codes_test", "report", "decoded",
                                                 "prior", "prior_samples")}
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    _say(f"1/8 Fashion-MNIST (real IDX files from {opts.source}) -> WebDataset shards in {paths['shards']}")
    if not list(Path(paths["shards"]).glob("test-*.tar")):
        prepare_fashion_mnist(paths["shards"], source=opts.source, shard_size=5000, limit=opts.limit)
    times["prepare_s"] = time.perf_counter() - t0
    train = [f"{paths['shards']}/train-*.tar"]
    test = [f"{paths['shards']}/test-*.tar"]

    _say(f"2/8 DDP training: {opts.nproc} processes (torchrun, gloo on CPU), {opts.steps} steps -> {paths['run']}")
    t = time.perf_counter()
    final = launch(TrainArgs(config=opts.config, train_data=train, val_data=test, out=paths["run"],
                             nproc_per_node=opts.nproc, max_steps=opts.steps, resume=True,
                             sets=["train.val_every=1000000", f"train.checkpoint_every={max(opts.steps // 2, 1)}"]))
    times["train_s"] = time.perf_counter() - t

    _say(f"3/8 Ray tokenization: the training images -> {paths['codes']}, the test images -> "
         f"{paths['codes_test']}")
    t = time.perf_counter()
    summary = run_tokenize(TokenizeConfig(tokenizer=final, inputs=train, output=paths["codes"],
                                          keep_fields=["cls"], overwrite=True))
    run_tokenize(TokenizeConfig(tokenizer=final, inputs=test, output=paths["codes_test"],
                                keep_fields=["cls"], overwrite=True))
    times["tokenize_s"] = time.perf_counter() - t

    _say(f"4/8 evaluation on the test images -> {paths['report']}")
    t = time.perf_counter()
    report = evaluate(final, test, paths["report"])
    times["eval_s"] = time.perf_counter() - t

    _say(f"5/8 decoding {opts.decode_limit} code grids back to PNGs -> {paths['decoded']}")
    t = time.perf_counter()
    decode_output(final, paths["codes"], paths["decoded"], limit=opts.decode_limit)
    times["decode_s"] = time.perf_counter() - t

    _say(f"6/8 a class-conditional prior over the training codes: {opts.nproc} processes, "
         f"{opts.prior_steps} steps -> {paths['prior']}")
    t = time.perf_counter()
    prior = launch_prior(PriorArgs(config=opts.prior_config, codes=paths["codes"], out=paths["prior"],
                                   nproc_per_node=opts.nproc, max_steps=opts.prior_steps, resume=True))
    times["prior_train_s"] = time.perf_counter() - t

    _say("7/8 the prior on the held-out test codes (bits per code; bits per dim with the test images)")
    t = time.perf_counter()
    prior_eval = evaluate_prior(prior, paths["codes_test"], tokenizer=final, images=test)
    times["prior_eval_s"] = time.perf_counter() - t

    _say(f"8/8 sampling {opts.prior_samples} code grids per class, decoded -> {paths['prior_samples']}")
    t = time.perf_counter()
    samples = sample_prior(prior, final, paths["prior_samples"], opts.prior_samples, overwrite=True)
    times["prior_sample_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    info = inspect_output(paths["codes"])
    keep = ("bits_per_code", "unigram_bits_per_code", "uniform_bits_per_code", "bits_per_dim",
            "train_test_gap_bits_per_code")
    result = {"paths": {**paths, "tokenizer": final, "prior_final": prior, "samples_png": samples["grid"]},
              "eval": report.to_dict(),
              "tokenize": {k: summary[k] for k in ("shards", "done", "error_rate", "samples_per_s") if k in summary},
              "rows": info.get("rows"), "times": {k: round(v, 1) for k, v in times.items()},
              "prior": {**{k: prior_eval[k] for k in keep}, "novelty": samples["novelty"]}}
    _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    p = result["paths"]
    print(
        "\nvqtok demo finished in {total:.0f}s\n"
        "  tokenizer        {tokenizer}   (config.json + model.safetensors)\n"
        "  training run     {run}   (metrics.jsonl, val/*.png, checkpoints/)\n"
        "  codes (Parquet)  {codes}   ({rows} training rows; _manifest/, _errors/, _SUCCESS)\n"
        "                   {codes_test}   (the test split, held out)\n"
        "  eval report      {report}   (PNG grid of originals vs reconstructions, code-usage histogram)\n"
        "  decoded samples  {decoded}\n"
        "  eval             {eval}\n"
        "  prior            {prior_final}   (run: {prior}/metrics.jsonl)\n"
        "  prior on test    {prior_eval}\n"
        "  prior samples    {prior_samples}   (a vqtok output; decoded, a row per class: {samples_png})\n"
        "Next: vqtok inspect {codes} ; vqtok verify {prior_samples}"
        .format(total=result["times"]["total_s"], rows=result["rows"],
                eval=json.dumps({k: v for k, v in result["eval"].items() if k != "files"}),
                prior_eval=json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in result["prior"].items()}), **p),
        flush=True)
