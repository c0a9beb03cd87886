"""CPU encode speed of the exact nearest-code search, one thread: `VQVAE.encode` and the tokenize
stage's `CodeEncoder.encode` against the fp32-only search, and against the code of an earlier git
revision (its `tokenizer/nearest.py` as `VQVAE.encode` ran it, and its tokenize-stage search
`stable_nearest`) when --baseline-ref names one. Methods run round-robin per micro-batch (A, B,
C, A, B, C, ...) so load from other processes hits all alike; best and median speeds and ratios
are printed, with the share of rows the float64 re-decision handles.

    python benchmarks/encode.py --baseline-ref f94e5b3                    # k-means-initialised tokenizer
    python benchmarks/encode.py --baseline-ref f94e5b3 --tokenizer RUN/final   # and a trained one

Images: the Fashion-MNIST test split (28x28), micro-batches of 64 as the tokenize workers use.
"""
from __future__ import annotations

import os
import sys

# run as a path, the script's folder comes first on sys.path and benchmarks/ holds tokenize.py:
# drop it before anything imports the standard library's tokenize
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import gzip
import subprocess
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from pipelines.tokenize.encoder import CPU_MICRO_BATCH, CodeEncoder
from tokenizer import VQVAE, VQVAEConfig
from tokenizer import nearest as nm

ROOT = Path(__file__).resolve().parent.parent
FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def fashion_images(count: int) -> np.ndarray:
    """(count, 1, 28, 28) uint8 from the IDX file."""
    with gzip.open(FASHION) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return raw.reshape(-1, 1, 28, 28)[:count].copy()


def kmeans_tokenizer(images: np.ndarray, folder: str) -> str:
    """The default Fashion-MNIST model, untrained, its codebook k-means-initialised on 256
    images: a barely trained tokenizer, where near-ties are many."""
    import yaml
    config = yaml.safe_load((ROOT / "configs" / "fashion_mnist.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.from_dict(config)).train()
    with torch.no_grad():
        model(torch.from_numpy(images[:256]).float() / 255)
    model.eval().save_pretrained(folder)
    return folder


def module_at(ref: str, path: str, name: str) -> types.ModuleType:
    """A module made from `path` as it was at git revision `ref` of this repository."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)
    module.__package__ = os.path.dirname(path).replace("/", ".")   # for its relative imports
    sys.modules[name] = module
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


def build_methods(tok_dir: str, baseline_ref: str | None):
    model = VQVAE.from_pretrained(tok_dir).eval()
    q = model.quantizer
    enc = CodeEncoder(tok_dir, device="cpu", threads=1)

    def from_latents(search):
        def run(batch: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(batch).float().div_(255.0)
            flat = q.search_vectors(model.encode_latents(x))
            return search(flat, q.search_codebook()).reshape(len(batch), -1)
        return run

    methods = {}
    if baseline_ref:
        old_nearest = module_at(baseline_ref, "tokenizer/nearest.py", "old_nearest")
        old_encoder = module_at(baseline_ref, "pipelines/tokenize/encoder.py", "old_encoder")
        methods[f"old VQVAE.encode ({baseline_ref}, fp32)"] = from_latents(
            lambda z, b: old_nearest.nearest_codes(z, b, q.config.chunk_size))
        if hasattr(old_encoder, "stable_nearest"):
            methods[f"old CodeEncoder search ({baseline_ref})"] = from_latents(old_encoder.stable_nearest)
    methods["fp32 only (exact=False)"] = from_latents(
        lambda z, b: nm.nearest_codes(z, b, q.config.chunk_size, exact=False))
    methods["new VQVAE.encode (exact)"] = lambda batch: model.encode(
        torch.from_numpy(batch).float().div_(255.0)).reshape(len(batch), -1)
    methods["new CodeEncoder.encode (exact)"] = lambda batch: torch.from_numpy(enc.encode(batch))
    return model, methods


@torch.inference_mode()
def run_all(methods, images: np.ndarray, rounds: int):
    """Interleaved per micro-batch: for every batch of 64 images each method runs once in turn
    (in a rotating order), so a burst of load from other processes hits all of them alike. -> ({name: (rounds, batches)
    seconds}, {name: codes})."""
    m = CPU_MICRO_BATCH
    batches = [images[i:i + m] for i in range(0, len(images), m)]
    codes = {name: torch.cat([fn(b) for b in batches]).long() for name, fn in methods.items()}
    times = {name: np.zeros((rounds, len(batches))) for name in methods}
    names = list(methods)
    for r in range(rounds):
        for i, batch in enumerate(batches):
            shift = (r + i) % len(names)          # rotate the order: no method is always first
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                methods[name](batch)
                times[name][r, i] = time.perf_counter() - t0
    return times, codes


@torch.inference_mode()
def redecided_share(model: VQVAE, images: np.ndarray) -> float:
    x = torch.from_numpy(images).float() / 255
    q = model.quantizer
    flats = [q.search_vectors(model.encode_latents(x[i:i + 64])) for i in range(0, len(x), 64)]
    return nm.ambiguous_fraction(torch.cat(flats), q.search_codebook())


def report(label: str, model, methods, images, rounds: int) -> None:
    times, codes = run_all(methods, images, rounds)
    n = len(images)
    names = list(methods)
    base = names[0]
    exact = codes["new VQVAE.encode (exact)"]
    print(f"\n== {label}: {n} images, {rounds} rounds interleaved per micro-batch of "
          f"{CPU_MICRO_BATCH}, 1 thread; re-decided rows: {100 * redecided_share(model, images):.3f}%")
    print("best img/s: every micro-batch's fastest of the rounds (the least disturbed); median "
          "img/s: the median round's total")
    print(f"{'method':42s} {'best img/s':>10s} {'x base':>7s} {'median img/s':>12s} {'x base':>7s} "
          f"{'codes != exact':>15s}")
    best = {name: n / t.min(axis=0).sum() for name, t in times.items()}
    med = {name: n / float(np.median(t.sum(axis=1))) for name, t in times.items()}
    for name in names:
        diff = int((codes[name] != exact).sum())
        print(f"{name:42s} {best[name]:10.0f} {best[name] / best[base]:7.3f} {med[name]:12.0f} "
              f"{med[name] / med[base]:7.3f} {diff:15d}")
    for name in names[1:]:   # per batch and round, the ratio to the baseline's run of that batch
        ratio = times[base] / times[name]
        print(f"  {name} / {base}: median per-batch speed ratio {np.median(ratio):.3f} "
              f"(quartiles {np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--tokenizer", action="append", default=[], help="trained tokenizer directory")
    p.add_argument("--baseline-ref", default=None, help="git revision to compare against")
    p.add_argument("--no-kmeans", action="store_true", help="skip the k-means-initialised tokenizer")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    images = fashion_images(a.images)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    tokenizers = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_kmeans:
            tokenizers.append(("k-means-initialised tokenizer", kmeans_tokenizer(images, tmp)))
        tokenizers += [(f"tokenizer {t}", t) for t in a.tokenizer]
        for label, tok in tokenizers:
            model, methods = build_methods(tok, a.baseline_ref)
            report(label, model, methods, images, a.rounds)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
