"""`vqtok prior train / eval / sample` on tiny tokenize outputs of a tiny tokenizer."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codes_output import output_metadata, save_tiny_model, write_output
from pipelines import CodesDataset
from pipelines import output_format as fmt
from pipelines.cli import main
from pipelines.decode import decode_output
from pipelines.prior.config import PriorTrainConfig, resolve_prior_config
from pipelines.prior.data import CodeBatches
from pipelines.prior.evaluate import discretised_gaussian_bits
from pipelines.prior.export import TrainStats, export_prior, grid_hashes
from pipelines.verify import verify_output
from tokenizer import Prior, PriorConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
TINY = ["model.d_model=16", "model.layers=1", "model.heads=2", "data.num_workers=0", "train.progress=false",
        "data.eval_rows=64", "optim.warmup_steps=0"]


def sets(*items):
    return [a for s in (*TINY, *items) for a in ("--set", s)]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return str(root / "tok"), save_tiny_model(root / "tok")


def write_class_codes(out, model, classes=4, per_class=16, shards=2):
    """Row i of class c: codes (3c + t) % K at every position t except the first two, which
    spell i (so tests can tell rows apart); learnable only through the class."""
    h, w = model.grid
    k = model.codebook_size
    meta = output_metadata(model)
    schema = fmt.data_schema(meta, [pa.field("cls", pa.int64())])
    os.makedirs(out, exist_ok=True)
    i, classes_of = 0, {}
    for shard in range(shards):
        rows = []
        for c in range(classes):
            for _ in range(per_class // shards):
                rows.append((i, c, [i // k, i % k] + [(3 * c + t) % k for t in range(2, h * w)]))
                classes_of[i] = c
                i += 1
        table = pa.table({"key": [f"r{n}" for n, _, _ in rows], "shard": [f"s{shard}"] * len(rows),
                          "codes": [codes for _, _, codes in rows], "cls": [c for _, c, _ in rows]}, schema=schema)
        pq.write_table(table, fmt.data_path(str(out), f"s{shard}"), row_group_size=8)
    open(fmt.success_path(str(out)), "w").close()
    write_class_codes.classes_of = classes_of
    return str(out)


def row_ids(batch, k=16) -> list[int]:
    flat = batch["codes"].reshape(len(batch["codes"]), -1)
    return (flat[:, 0] * k + flat[:, 1]).tolist()


# ---- data -----------------------------------------------------------------------------------------
def test_code_batches_use_every_row_once_per_epoch_and_resume_where_they_stopped(tmp_path, tok):
    _, model = tok
    codes = write_class_codes(tmp_path / "c", model, per_class=10)       # 40 rows
    epochs = {0: [], 1: []}
    for rank in range(2):
        ds = CodesDataset(codes, rank=rank, world_size=2, shuffle=True, shuffle_buffer=4, fields=("cls",))
        for slot in range(2):
            stream = CodeBatches(ds, 3, "cls").stream(slot, 2)
            batches = [next(stream) for _ in range(7)]                # 21 rows: 10 a slot per epoch
            ids = [i for b in batches for i in row_ids(b)]
            epochs[0] += ids[:10]
            epochs[1] += ids[10:20]                  # batch 4 holds the last row of epoch 0 and two of epoch 1
            classes_of = write_class_codes.classes_of
            assert all(int(c) == classes_of[i] for b in batches for i, c in zip(row_ids(b), b["cls"]))
            # a stream started at batch 3's position goes on with batch 4, 5, ...
            again = CodeBatches(ds, 3, "cls", start={slot: (batches[3]["epoch"], batches[3]["offset"])})
            resumed = again.stream(slot, 2)
            for expected in batches[4:]:
                assert torch.equal(next(resumed)["codes"], expected["codes"])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))   # each epoch: every row once
    assert epochs[0] != epochs[1]                                      # in another order


def test_a_resumed_loader_serves_the_batches_the_unbroken_one_would_have(tmp_path, tok):
    """DataLoader workers take turns; after 3 batches of 2 workers the next comes from worker 1,
    so the resumed loader's worker 0 must play slot 1 (rotation)."""
    from pipelines.train.data import make_loader
    _, model = tok
    codes = write_class_codes(tmp_path / "c", model, per_class=10)
    ds = CodesDataset(codes, shuffle=True, shuffle_buffer=4, fields=("cls",))
    unbroken = iter(make_loader(CodeBatches(ds, 4, "cls"), 2))
    batches = [next(unbroken) for _ in range(7)]
    assert [b["slot"] for b in batches] == [0, 1, 0, 1, 0, 1, 0]
    positions = {b["slot"]: (b["epoch"], b["offset"]) for b in batches[:3]}
    resumed = iter(make_loader(CodeBatches(ds, 4, "cls", start=positions, rotation=3), 2))
    for expected in batches[3:]:
        got = next(resumed)
        assert got["slot"] == expected["slot"] and torch.equal(got["codes"], expected["codes"])


# ---- eval -----------------------------------------------------------------------------------------
def hand_prior(out, model, bias, counts, hashes=(), classes=10, extra=None) -> Prior:
    """A prior whose every prediction is softmax(bias), exported with the given train stats."""
    k = model.codebook_size
    prior = Prior(PriorConfig(k, model.grid, classes, d_model=8, layers=1, heads=2, dropout=0.0))
    for p in prior.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        prior.head.bias.copy_(torch.as_tensor(bias))
    stats = TrainStats(np.asarray(counts, np.int64), np.sort(np.asarray(hashes, np.int64)), 7)
    meta = output_metadata(model)
    export_prior(str(out), prior, stats, meta, {"label_field": "cls" if classes else "",
                                                 "train_bits_per_code": 1.5, **(extra or {})})
    return prior


def test_eval_equals_a_hand_computed_nll_and_baselines(tmp_path, tok):
    _, model = tok
    rows = write_output(tmp_path / "held", model, {"a": 5, "b": 4})        # codes from random images
    codes = np.stack([r["codes"].reshape(-1) for r in rows.values()])      # (9, 16)
    g = np.random.default_rng(0)
    bias, counts = g.normal(size=16), g.integers(0, 50, 16)
    hand_prior(tmp_path / "prior", model, bias, counts)
    result = run("prior", "eval", "--prior", tmp_path / "prior", "--codes", tmp_path / "held")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    log_p = bias - np.log(np.exp(bias).sum())
    expected = -log_p[codes].mean() / math.log(2)
    p_unigram = (counts + 1) / (counts.sum() + 16)
    assert got["bits_per_code"] == pytest.approx(expected, rel=1e-5)
    assert got["unigram_bits_per_code"] == pytest.approx(-np.log2(p_unigram[codes]).mean(), rel=1e-9)
    assert got["uniform_bits_per_code"] == 4.0 and got["rows"] == 9 and got["codes_per_image"] == 16
    assert got["bits_per_image"] == pytest.approx(16 * expected, rel=1e-5)
    assert got["train_test_gap_bits_per_code"] == pytest.approx(expected - 1.5, rel=1e-5)
    assert got["bits_per_dim"] is None and "--images" in got["bits_per_dim_note"]
    limited = run("prior", "eval", "--prior", tmp_path / "prior", "--codes", tmp_path / "held", "--limit", 2)
    assert json.loads(limited.stdout)["rows"] == 2


def test_the_reconstruction_term_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64).reshape(256, 1, 1, 1)
    for mean, sigma in ((3.2, 1.5), (250.0, 10.0), (128.0, 0.7)):
        bits = discretised_gaussian_bits(levels, torch.full_like(levels, mean), sigma)
        assert float((2.0 ** -bits).sum()) == pytest.approx(1.0, abs=1e-9)
        hand = 0.5 * (math.erf((130.5 - mean) / sigma / 2 ** 0.5) - math.erf((129.5 - mean) / sigma / 2 ** 0.5))
        assert float(bits[130]) == pytest.approx(-math.log2(max(hand, 1e-300)), rel=1e-6)


# ---- sample ---------------------------------------------------------------------------------------
def test_sample_writes_an_output_that_verifies_decodes_and_reports_copies(tmp_path, tok):
    tok_dir, model = tok
    bias = np.zeros(16)
    bias[5] = 30.0                                   # every code 5: one grid, always
    copied = grid_hashes(np.full((1, *model.grid), 5))
    hand_prior(tmp_path / "prior", model, bias, np.ones(16), hashes=copied, classes=3)
    out = tmp_path / "samples"
    result = run("prior", "sample", "--prior", tmp_path / "prior", "--tokenizer", tok_dir, "--out", out, "--n", 4)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples_drawn"] == 12 and summary["classes"] == [0, 1, 2]
    assert summary["copied_share"] == 1.0 and summary["novelty"] == 0.0 and summary["unique_share"] == 1 / 12
    report = verify_output(str(out))
    assert report["ok"], report["findings"]
    assert report["rows"] == 12 and report["checksums_checked"] == 1
    rows = list(CodesDataset(str(out)))
    assert [r["cls"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(bool((r["codes"] == 5).all()) for r in rows)
    decoded = decode_output(tok_dir, str(out), str(tmp_path / "png"))
    assert decoded.images == 12
    with Image.open(out / "_samples.png") as img:                # a row per class, 4 tiles each
        side = model.config.resolution * -(-64 // model.config.resolution)
        assert img.size == (4 * (side + 2) + 2, 3 * (side + 2) + 2)
    one = run("prior", "sample", "--prior", tmp_path / "prior", "--tokenizer", tok_dir,
              "--out", tmp_path / "one", "--n", 2, "--class", 1)
    assert json.loads(one.stdout)["classes"] == [1]
    # another temperature is another sample set: refused in the same OUT unless --overwrite
    again = run("prior", "sample", "--prior", tmp_path / "prior", "--tokenizer", tok_dir, "--out", out,
                "--n", 4, "--temperature", "0.5")
    one_line_error(again, "--overwrite")


# ---- training -------------------------------------------------------------------------------------
def test_train_learns_class_codes_then_eval_and_sample_show_it(tmp_path, tok):
    tok_dir, model = tok
    codes = write_class_codes(tmp_path / "codes", model)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny matmuls: one thread avoids contention on a shared 2-core box
    try:
        r = run("prior", "train", "--codes", codes, "--out", out, "--max-steps", 150, "--batch-size", 16,
                *sets("optim.lr=1e-2", "train.log_every=50", "train.checkpoint_every=100", f"data.val={codes}",
                      "train.val_every=150"))
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    assert "prior exported to" in r.output
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [x for x in records if x["split"] == "train"]
    assert [x["step"] for x in train] == [50, 100, 150] and train[-1]["tokens_per_s"] > 0
    assert [x["step"] for x in records if x["split"] == "val"] == [150]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000100.pt", "step-00000150.pt"]
    recorded = (out / "config.yaml").read_text()
    assert "num_classes: 4" in recorded                  # resolved from the codes, recorded
    ev = json.loads(run("prior", "eval", "--prior", out / "final", "--codes", codes).stdout)
    assert ev["bits_per_code"] < 0.5 * ev["unigram_bits_per_code"]   # the class gives the codes away
    assert ev["classes"] == 4 and ev["train_bits_per_code"] == pytest.approx(ev["bits_per_code"], abs=0.05)
    s = run("prior", "sample", "--prior", out / "final", "--tokenizer", tok_dir, "--out", tmp_path / "s",
            "--n", 3, "--temperature", "0.3")
    assert s.exit_code == 0, s.output
    for row in CodesDataset(str(tmp_path / "s")):
        expected = torch.tensor([(3 * row["cls"] + t) % 16 for t in range(2, 16)])
        assert (row["codes"].reshape(-1)[2:] == expected).float().mean() > 0.9   # samples follow their class


def test_a_signal_stops_training_after_a_checkpoint_and_resume_finishes(tmp_path, tok):
    _, model = tok
    codes = write_class_codes(tmp_path / "codes", model)
    out = tmp_path / "run"
    args = ["prior", "train", "--codes", codes, "--out", out, "--batch-size", 8]
    metrics = out / "metrics.jsonl"

    def interrupt():        # SIGINT (not SIGTERM): without a handler it fails the test, not pytest
        deadline = time.time() + 60
        while time.time() < deadline and not (metrics.exists() and '"step": 2,' in metrics.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    r = run(*args, "--max-steps", 100000, *sets("train.log_every=1", "train.checkpoint_every=100000"))
    assert r.exit_code == 130, r.output
    assert "[vqtok prior] stopped by SIGINT after step" in r.output and "--resume" in r.output
    step = int(r.output.split("after step ")[1].split(";")[0])
    assert os.listdir(out / "checkpoints") == [f"step-{step:08d}.pt"] and not (out / "final").exists()
    r = run(*args, "--max-steps", step + 2, "--resume", *sets("train.log_every=1", "train.checkpoint_every=100000"))
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and (out / "final" / "model.safetensors").exists()
    assert [json.loads(x)["step"] for x in open(metrics)][-1] == step + 2


def test_ddp_training_resumed_from_a_checkpoint_ends_with_the_same_weights(tmp_path, tok):
    """2 ranks x 2 DataLoader workers, 6 steps: the same run resumed from its step-3 checkpoint
    (the data stream restarts mid-epoch and mid-rotation) exports bit-identical weights."""
    _, model = tok
    codes = write_class_codes(tmp_path / "codes", model)
    a = tmp_path / "a"
    cmd = [sys.executable, "-m", "pipelines", "prior", "train", "--codes", codes, "--out", str(a),
           "--nproc-per-node", "2", "--max-steps", "6", "--batch-size", "8",
           *sets("data.num_workers=2", "train.checkpoint_every=3", "model.dropout=0.1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "final")
    os.remove(b / "checkpoints" / "step-00000006.pt")
    r = subprocess.run([x if x != str(a) else str(b) for x in cmd] + ["--resume"], capture_output=True,
                       text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "at step 3" in r.stdout + r.stderr
    sha = [json.loads((run / "final" / "config.json").read_text())["weights_sha256"] for run in (a, b)]
    assert sha[0] == sha[1]
    state = torch.load(b / "checkpoints" / "step-00000006.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and [r["num_workers"] for r in state["ranks"]] == [2, 2]


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def others(tmp_path_factory, tok):
    """Outputs of the module's tokenizer, of another tokenizer with the same K, and of one with
    another K; a prior trained (by hand) on the first."""
    _, model = tok
    root = tmp_path_factory.mktemp("others")
    same_k = save_tiny_model(root / "tok_same_k", seed=1)
    other_k = save_tiny_model(root / "tok_other_k", codebook_size=32)
    write_output(root / "mine", model, {"a": 3})
    write_output(root / "same_k", same_k, {"a": 3})
    write_output(root / "other_k", other_k, {"a": 3})
    write_output(root / "mixed", model, {"a": 3})
    write_output(root / "mixed_b", same_k, {"b": 3})
    shutil.copy(root / "mixed_b" / "b.parquet", root / "mixed" / "b.parquet")
    hand_prior(root / "prior", model, np.zeros(16), np.ones(16))
    return root


@pytest.mark.parametrize("args, message", [
    (["prior", "eval", "--prior", "{r}/prior", "--codes", "{r}/same_k"], "was trained on codes of tokenizer"),
    (["prior", "eval", "--prior", "{r}/prior", "--codes", "{r}/other_k"], "has codebook_size 32, the prior"),
    (["prior", "sample", "--prior", "{r}/prior", "--tokenizer", "{r}/tok_other_k", "--out", "{r}/s"],
     "has codebook_size 32, the prior"),
    (["prior", "eval", "--prior", "{r}/tok_same_k", "--codes", "{r}/mine"], "not a vqtok prior directory"),
    (["prior", "train", "--codes", "{r}/mine", "--out", "{r}/run", "--set", "data.val={r}/same_k"],
     "held-out codes must come from the tokenizer"),
    (["prior", "train", "--codes", "{r}/mixed", "--out", "{r}/run"], "files name different tokenizers"),
    (["prior", "train", "--codes", "{r}/mine", "--out", "{r}/run", "--set", "model.num_classes=2"],
     "model.num_classes = 2, but"),
    (["prior", "train", "--codes", "{r}/mine", "--out", "{r}/run", "--set", "model.d_model=30"],
     "model.d_model = 30 must be divisible by model.heads = 4"),
    (["prior", "train", "--out", "{r}/run"], "data.codes is empty"),
])
def test_bad_inputs_are_one_line_errors(others, args, message):
    one_line_error(run(*[a.format(r=others) for a in args]), message)


def test_the_shipped_configs_parse_and_the_cpu_one_is_the_default():
    cpu = resolve_prior_config(os.path.join(CONFIGS, "prior_cpu.yaml"), codes="x")
    default = resolve_prior_config(None, codes="x")
    assert cpu == default
    gpu = resolve_prior_config(os.path.join(CONFIGS, "prior_gpu.yaml"), codes="x")
    assert isinstance(gpu, PriorTrainConfig) and gpu.model.d_model > cpu.model.d_model


def test_resume_refuses_codes_of_another_tokenizer_under_the_same_path(tmp_path, others):
    codes = tmp_path / "codes"
    shutil.copytree(others / "mine", codes)
    args = ["prior", "train", "--codes", codes, "--out", tmp_path / "run", "--batch-size", 2, *sets()]
    assert run(*args, "--max-steps", 2).exit_code == 0
    shutil.rmtree(codes)
    shutil.copytree(others / "same_k", codes)                      # same K, grid and path: other codes
    one_line_error(run(*args, "--max-steps", 4, "--resume"), "was trained on codes of tokenizer")
