"""`vqtok train` in one process: config, data stream split/resume, checkpoints, outputs, errors,
SIGKILL + --resume."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.config import to_dict
from pipelines.errors import UserError
from pipelines.prepare import ShardWriter
from pipelines.train.config import (changed_keys, parse_config, record_run_config, resolve_config,
                                    run_config_url)
from pipelines.train.checkpoint import same_data_layout
from pipelines.train.data import DataMismatch, ShardStream, data_workers, make_loader
from tokenizer import VQVAE, ConfigError

TINY = ["model.hidden=16", "model.res_hidden=8", "model.code_dim=8", "model.num_res_blocks=1",
        "model.quantizer.codebook_size=32", "data.num_workers=0", "data.shuffle_buffer=16",
        "data.val_samples=32", "train.progress=false"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def indexed_image(i: int, size: int = 28) -> np.ndarray:
    """A grey image whose first two pixels spell its index (so a batch names its samples)."""
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, (size, size), dtype=np.uint8)
    img[0, 0], img[0, 1] = i // 256, i % 256
    return img


def write_shards(out, n: int, per_shard: int, corrupt: tuple[int, ...] = (), prefix="train") -> str:
    with ShardWriter(str(out), f"{prefix}-%06d.tar", per_shard) as w:
        for i in range(n):
            data = b"\x89PNG but truncated" if i in corrupt else png(indexed_image(i))
            w.write({"__key__": f"s{i:06d}", "png": data, "cls": b"0"})
    return str(out / f"{prefix}-*.tar")


def ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def epoch_ids(urls, rank, world, workers, batch=4):
    stream = ShardStream(urls, channels=1, resolution=28, batch_size=batch, rank=rank, world_size=world,
                         seed=3, shuffle_buffer=8, endless=False)
    return [i for b in make_loader(stream, workers) for i in ids(b["images"])]


@pytest.mark.parametrize("shards", [8, 3])   # more shards than slots, and fewer (sample split)
def test_stream_splits_an_epoch_over_ranks_and_workers_without_overlap(tmp_path, shards):
    from pipelines.shards.urls import expand_urls
    urls = expand_urls([write_shards(tmp_path, 96, 96 // shards)])
    seen = [epoch_ids(urls, rank, 2, 2) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(96))
    assert seen[0] != sorted(seen[0])        # shuffled


def test_stream_resumes_exactly_from_a_position(tmp_path):
    from pipelines.shards.urls import expand_urls
    urls = expand_urls([write_shards(tmp_path, 40, 10)])
    kw = dict(channels=1, resolution=28, batch_size=6, seed=1, shuffle_buffer=8)
    full = iter(ShardStream(urls, **kw))
    batches = [next(full) for _ in range(12)]          # crosses an epoch boundary (40 samples)
    assert {b["epoch"] for b in batches} == {0, 1}
    pos = batches[4]
    resumed = iter(ShardStream(urls, start={0: (pos["epoch"], pos["offset"])}, **kw))
    for expected in batches[5:]:
        assert ids(next(resumed)["images"]) == ids(expected["images"])


def test_undecodable_samples_are_counted_and_skipped(tmp_path):
    from pipelines.shards.urls import expand_urls
    urls = expand_urls([write_shards(tmp_path, 20, 10, corrupt=(3, 11, 12))])
    batches = list(ShardStream(urls, channels=1, resolution=28, batch_size=5, shuffle_buffer=4,
                               endless=False))
    got = [i for b in batches for i in ids(b["images"])]
    assert sorted(got) == sorted(set(range(20)) - {3, 11, 12})
    assert batches[-1]["bad"] == 3


def test_a_block_aligned_truncated_shard_keeps_its_head_and_is_named(tmp_path, capfd):
    from pipelines.shards.urls import expand_urls
    sys.path.insert(0, os.path.dirname(__file__))
    import tok_data as td
    broken = td.broken_shards(tmp_path)            # blockcut.tar: 5 samples, no end-of-archive marker
    urls = expand_urls([str(tmp_path / "whole.tar"), str(tmp_path / "blockcut.tar")])
    batches = list(ShardStream(urls, channels=1, resolution=28, batch_size=4, shuffle_buffer=4,
                               endless=False))
    err = capfd.readouterr().err
    assert "blockcut.tar" in err and "no end-of-archive marker" in err and "whole.tar" not in err
    assert batches[-1]["damaged"] == 1
    # the readable head is used; the last sample (its fields may be cut) is counted as bad
    assert sum(len(b["images"]) for b in batches) == len(broken["whole"]["ok"]) + len(broken["blockcut"]["ok"])
    assert batches[-1]["bad"] == 1


def test_training_sees_the_pixels_tokenize_sees(tmp_path):
    """One image policy: RGBA, palette, 16-bit and EXIF-rotated images decode to identical arrays
    in the training stream and in the tokenize decoder."""
    sys.path.insert(0, os.path.dirname(__file__))
    import tok_data as td
    from pipelines.tokenize.shard_decoder import DecodeSpec, InlineDecoder
    samples, _, _ = td.odd_samples()
    odd = {k: f for k, f in samples if k in ("rgba", "palette", "grey16", "exif")}
    td.write(tmp_path / "odd.tar", td.tar_bytes(list(odd.items())))
    for channels in (1, 3):
        stream = ShardStream([str(tmp_path / "odd.tar")], channels=channels, resolution=28, batch_size=4,
                             shuffle_buffer=1, endless=False, strict_size=False)
        (batch,) = list(stream)
        gen = InlineDecoder(DecodeSpec(channels, 28, (), 4)).batches(str(tmp_path / "odd.tar"))
        _, images, decoded = next(gen)
        assert decoded.keys == list(odd) and decoded.count == 4
        np.testing.assert_array_equal(batch["images"].numpy(), images)   # same order, shuffle_buffer=1
        assert batch["images"].shape == (4, channels, 28, 28)


def test_strict_size_refuses_other_sizes_and_otherwise_resizes(tmp_path):
    with ShardWriter(str(tmp_path), "big-%06d.tar", 10) as w:
        w.write({"__key__": "a", "png": png(indexed_image(0, size=56))})
    url = str(tmp_path / "big-000000.tar")
    with pytest.raises(DataMismatch, match="56x56 but model.resolution = 28.*data.strict_size=false"):
        next(iter(ShardStream([url], channels=1, resolution=28, batch_size=1)))
    batch = next(iter(ShardStream([url], channels=1, resolution=28, batch_size=1, strict_size=False)))
    assert batch["images"].shape == (1, 1, 28, 28)


def test_channel_mismatch_inside_the_stream_stops_with_a_clear_error(tmp_path):
    from pipelines.shards.urls import expand_urls
    urls = expand_urls([write_shards(tmp_path, 8, 8)])
    with pytest.raises(DataMismatch, match="1 channel.*model.in_channels = 3"):
        next(iter(ShardStream(urls, channels=3, resolution=28, batch_size=4)))


def test_config_flags_override_yaml_and_bad_values_name_the_key(tmp_path):
    cfg = resolve_config("configs/fashion_mnist.yaml", ["optim.lr=5e-4"], train_data=["a-{0..1}.tar"],
                         max_steps=7, batch_size=64)
    assert cfg.model.quantizer.codebook_size == 512 and cfg.model.grid == (7, 7)
    assert cfg.optim.lr == 5e-4 and cfg.train.max_steps == 7 and cfg.data.batch_size == 64
    assert cfg.data.train == ["a-{0..1}.tar"]           # braces and commas survive
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        resolve_config(None, ["train.keep_checkpoints=0"], train_data=["x"])
    with pytest.raises(ConfigError, match="quantizer.decay = 2.0 must be in"):
        resolve_config(None, ["model.quantizer.decay=2"], train_data=["x"])
    with pytest.raises(ConfigError, match="unknown config key optim.momentum"):
        resolve_config(None, ["optim.momentum=0.9"], train_data=["x"])
    for name in ("photos32", "photos32_k8192", "photos32_k16384", "imagenet128"):
        cfg = resolve_config(f"configs/{name}.yaml", train_data=["x"])
        assert cfg.model.in_channels == 3
    for k in (8192, 16384):
        big = resolve_config(f"configs/photos32_k{k}.yaml", train_data=["x"]).model.quantizer
        assert big.codebook_size == k and big.codebook_dim == 16 and big.l2_normalize


def test_the_resolved_config_is_recorded_once_and_reads_back(tmp_path):
    cfg = resolve_config("configs/fashion_mnist.yaml", ["optim.lr=5e-4", "model.quantizer.decay=0.9"],
                         train_data=["a-{0..1}.tar"], max_steps=7)
    run = str(tmp_path / "run")
    text = record_run_config(cfg, run, resume=False)
    url = run_config_url(run)
    assert open(url).read() == text and not [n for n in os.listdir(run) if n != "config.yaml"]
    assert parse_config(text, url) == cfg
    # the record is a config file in its own right: `vqtok train --config RUN/config.yaml`
    assert resolve_config(url) == cfg
    assert "lr: 0.0005" in text and "decay: 0.9" in text and "max_steps: 7" in text


def fake_checkpoint(run) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004.pt").write_bytes(b"")


def test_resume_keeps_the_recorded_config_but_may_extend_the_run(tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config(None, ["model.hidden=16"], train_data=["x"], max_steps=10)
    record_run_config(cfg, str(run), resume=False)
    # nothing trained yet: a new config replaces the record, with or without --resume
    cfg = resolve_config(None, ["model.hidden=32"], train_data=["x"], max_steps=10)
    record_run_config(cfg, str(run), resume=True)
    assert parse_config((run / "config.yaml").read_text(), "x").model.hidden == 32
    fake_checkpoint(run)
    with pytest.raises(UserError, match="already has checkpoints .*pass --resume"):
        record_run_config(cfg, str(run), resume=False)
    before = (run / "config.yaml").read_text()
    changed = resolve_config(None, ["model.hidden=16", "optim.lr=0.5"], train_data=["x"], max_steps=10)
    with pytest.raises(UserError, match=r"config.yaml: --resume cannot change model.hidden \(32 recorded, "
                                        r"16 now\), optim.lr \(0.001 recorded, 0.5 now\)"):
        record_run_config(changed, str(run), resume=True)
    assert (run / "config.yaml").read_text() == before          # refused: the record is unchanged
    longer = resolve_config(None, ["model.hidden=32", "data.num_workers=0", "train.log_every=1"],
                            train_data=["x"], max_steps=20)
    assert set(changed_keys(cfg, longer)) == {"train.max_steps", "data.num_workers", "train.log_every"}
    record_run_config(longer, str(run), resume=True)
    assert parse_config((run / "config.yaml").read_text(), "x") == longer


def test_a_checkpoint_from_before_a_model_key_existed_still_matches_its_model():
    from pipelines.train.loop import same_model_config
    model = resolve_config(None, ["model.hidden=16"], train_data=["x"], max_steps=10).model
    recorded = to_dict(model)
    assert same_model_config(recorded, model)
    del recorded["decoder_res_blocks"]                 # written before the key existed
    assert same_model_config(recorded, model)
    assert not same_model_config({**recorded, "decoder_res_blocks": 3}, model)
    assert not same_model_config({**recorded, "hidden": 32}, model)
    assert not same_model_config({**recorded, "no_such_key": 1}, model)


def run_cli(args):
    return CliRunner().invoke(main, args)


def test_train_one_process_writes_metrics_grid_checkpoints_and_final(tmp_path):
    train = write_shards(tmp_path / "d", 64, 16)
    val = write_shards(tmp_path / "d", 32, 16, prefix="val")
    out = tmp_path / "run"
    sets = [a for s in TINY + ["train.log_every=2", "train.val_every=3", "train.checkpoint_every=2",
                               "train.keep_checkpoints=2"] for a in ("--set", s)]
    r = run_cli(["train", "--train-data", train, "--val-data", val, "--out", str(out), "--max-steps", "7",
                 "--batch-size", "8", *sets])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000006.pt", "step-00000007.pt"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_recs = [x for x in records if x["split"] == "train"]
    assert [x["step"] for x in train_recs] == [2, 4, 6, 7]
    for key in ("reconstruction", "commitment", "loss", "psnr_of_mean_mse", "usage", "perplexity",
                "images_per_s", "lr"):
        assert np.isfinite(train_recs[-1][key]), key
    last = train_recs[-1]
    assert last["psnr_of_mean_mse"] == pytest.approx(10 * np.log10(1 / last["reconstruction"]))
    val_recs = [x for x in records if x["split"] == "val"]
    assert [x["step"] for x in val_recs] == [3, 6, 7] and val_recs[-1]["samples"] == 32
    assert "psnr" not in val_recs[-1] and np.isfinite(val_recs[-1]["mean_psnr"])
    grid = Image.open(out / "val" / "step-00000007.png")
    # 2 bands of (8 originals above their 8 reconstructions); 28 px tiles scaled x3, 2 px apart,
    # an extra 4 px between the bands
    assert grid.size == (8 * (84 + 2) + 2, 4 * (84 + 2) + 2 + 4)
    state = torch.load(out / "checkpoints" / "step-00000007.pt", weights_only=True)
    assert state["step"] == 7 and "ema_sum" in "".join(state["model"]) and state["optimizer"]["state"]
    model = VQVAE.from_pretrained(str(out / "final"))
    assert torch.equal(model.state_dict()["quantizer.codebook"], state["model"]["quantizer.codebook"])
    # `vqtok eval` of the final model on the validation images reports what validation did
    r = run_cli(["eval", "--tokenizer", str(out / "final"), "--input", val, "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["images"] == val_recs[-1]["samples"]
    for key in ("mean_psnr", "usage", "perplexity"):
        assert report[key] == pytest.approx(val_recs[-1][key], abs=1e-4), key   # eval rounds to 4 places
    # an existing run is never overwritten silently
    r = run_cli(["train", "--train-data", train, "--out", str(out), "--max-steps", "7", "--batch-size", "8", *sets])
    assert r.exit_code == 1 and "pass --resume" in r.output and "Traceback" not in r.output
    # the config the rank trained with is the recorded one, overrides and flags included
    recorded = parse_config((out / "config.yaml").read_text(), "config.yaml")
    assert recorded.train.max_steps == 7 and recorded.data.batch_size == 8 and recorded.model.hidden == 16
    assert recorded.data.val == [val] and recorded.train.keep_checkpoints == 2
    assert state["config"] == to_dict(recorded)
    # resuming with another model is refused in one line naming the key, before any training
    r = run_cli(["train", "--train-data", train, "--out", str(out), "--max-steps", "9", "--batch-size", "8",
                 "--resume", *sets, "--set", "model.hidden=32"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--resume cannot change model.hidden (16 recorded, 32 now)" in r.output
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000006.pt", "step-00000007.pt"]


@pytest.mark.parametrize("args, message", [
    (["--train-data", "{tmp}/none-*.tar"], "no shard matches"),
    (["--set", "model.in_channels=3"], "1 channel(s) (L) but model.in_channels = 3"),
    (["--set", "optim.lr=zero"], "optim.lr = 'zero' must be a number"),
    (["--batch-size", "7", "--nproc-per-node", "2"], "not divisible by the 2 ranks"),
])
def test_user_mistakes_are_one_line(tmp_path, args, message):
    train = write_shards(tmp_path, 8, 8)
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["train", "--out", str(tmp_path / "run")] + ([] if "--train-data" in args else ["--train-data", train])
    r = run_cli(base + [a for s in TINY for a in ("--set", s)] + args)
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_resume_with_another_data_layout_starts_the_next_epoch(tmp_path):
    train = write_shards(tmp_path / "d", 64, 16)      # 8 steps of 8 per epoch on one slot
    out = tmp_path / "run"
    sets = [a for s in TINY + ["train.checkpoint_every=10"] for a in ("--set", s)]
    base = ["train", "--train-data", train, "--out", str(out), "--batch-size", "8", *sets]
    assert run_cli(base + ["--max-steps", "20"]).exit_code == 0
    before = torch.load(out / "checkpoints" / "step-00000020.pt", weights_only=True)["ranks"][0]
    assert before["positions"]["0"][0] == 2             # step 20 is inside epoch 2
    r = run_cli(base + ["--max-steps", "22", "--resume", "--set", "data.num_workers=2"])
    assert r.exit_code == 0, r.output
    assert "1 ranks x 0 data workers, this run has 1 x 2, so the data stream starts epoch 3" in r.output
    after = torch.load(out / "checkpoints" / "step-00000022.pt", weights_only=True)["ranks"][0]
    assert after["num_workers"] == 2 and after["positions"]
    assert all(epoch == 3 and offset <= 32 for epoch, offset in after["positions"].values())


def test_partial_checkpoint_saves_are_removed_and_never_listed(tmp_path):
    from pipelines.train.checkpoint import (checkpoint_dir, list_checkpoints,
                                            remove_partial_checkpoints, save_checkpoint)
    run = str(tmp_path / "run")
    save_checkpoint(run, 3, {"step": 3}, keep=2)
    ckdir = checkpoint_dir(run)
    partial = os.path.join(ckdir, ".step-00000006.pt.tmp-4242-0badf00d")   # a save killed mid-write
    open(partial, "wb").write(b"\x80\x02half a checkpoint")
    open(os.path.join(ckdir, ".notes"), "w").write("the user's own")
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert remove_partial_checkpoints(run) == [partial]
    assert sorted(os.listdir(ckdir)) == [".notes", "step-00000003.pt"]
    assert remove_partial_checkpoints(str(tmp_path / "none")) == []


def test_sigkill_mid_run_then_resume_reaches_max_step(tmp_path):
    train = write_shards(tmp_path / "d", 64, 16)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines", "train", "--train-data", train, "--out", str(out),
           "--batch-size", "8", "--max-steps", "400", *[a for s in TINY + ["train.checkpoint_every=3"]
                                                         for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    def newest_step():  # only the last k checkpoints are kept: step 6 itself may be gone already
        names = [n for n in os.listdir(out / "checkpoints") if n.endswith(".pt")] if (out / "checkpoints").is_dir() else []
        return max((int(n[5:13]) for n in names), default=0)
    while time.time() < deadline and newest_step() < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(out / "checkpoints")
    ckpts = sorted(n for n in names if not n.startswith("."))
    # a save killed mid-write leaves only its hidden temporary file, never a partial final name
    assert ckpts and all(c.endswith(".pt") for c in ckpts)
    assert all(n.startswith(".step-") and ".pt.tmp-" in n for n in names if n.startswith("."))
    for c in ckpts:
        torch.load(out / "checkpoints" / c, weights_only=True)
    killed_at = int(ckpts[-1][5:13])
    assert 6 <= killed_at < 400 and not (out / "final").exists()
    done = subprocess.run(cmd[:cmd.index("400")] + ["12" if killed_at < 12 else str(killed_at + 6)]
                          + cmd[cmd.index("400") + 1:] + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resumed from" in done.stdout + done.stderr
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]  # partial saves removed
    target = 12 if killed_at < 12 else killed_at + 6
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"train"' in x]
    assert steps[-1] == target
    assert torch.load(out / "checkpoints" / f"step-{target:08d}.pt", weights_only=True)["step"] == target
    assert VQVAE.from_pretrained(str(out / "final")).codebook_size == 32


def test_ctrl_c_in_one_process_saves_a_checkpoint_and_exits_130(tmp_path):
    train = write_shards(tmp_path / "d", 64, 16)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines", "train", "--train-data", train, "--out", str(out),
           "--batch-size", "8", "--max-steps", "100000",
           *[a for s in TINY + ["data.num_workers=1", "train.log_every=2", "train.checkpoint_every=100000"]
             for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and '"step": 4,' in metrics.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)         # the terminal's Ctrl-C: process and DataLoader worker
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT after step" in err and "Traceback" not in err, err[-3000:]
    step = int(err.split("after step ")[1].split(";")[0])
    assert os.listdir(out / "checkpoints") == [f"step-{step:08d}.pt"] and step >= 4
    assert torch.load(out / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)["step"] == step


def test_auto_data_workers_are_none_where_cpu_ranks_fill_the_cores():
    assert data_workers("auto", "cpu", local_ranks=2, cores=2) == 0       # CI: 2 ranks, 2 cores
    assert data_workers("auto", "cpu", local_ranks=1, cores=1) == 0
    assert data_workers("auto", "cpu", local_ranks=2, cores=4) == 2       # a core to spare per rank
    assert data_workers("auto", "cuda", local_ranks=8, cores=8) == 2      # the rank waits on its GPU
    assert data_workers(3, "cpu", local_ranks=2, cores=2) == 3            # a number is kept
    assert resolve_config(None, ["data.num_workers=auto"], train_data=["x"]).data.num_workers == "auto"
    for bad in ("many", "-1", "1.5"):
        with pytest.raises(ConfigError, match="data.num_workers = .* must be an integer >= 0 or 'auto'"):
            resolve_config(None, [f"data.num_workers={bad}"], train_data=["x"])
    # 0 workers (the rank reads) and 1 worker read the same single slot: the same layout
    rec = [{"num_workers": 0}, {"num_workers": 0}]
    assert same_data_layout(rec, 2, 1) and same_data_layout(rec, 2, 0) and not same_data_layout(rec, 2, 2)
    assert not same_data_layout([{}], 1, 1)                               # nothing recorded


def test_zero_and_one_data_worker_train_the_same_weights_and_resume_across(tmp_path):
    train = write_shards(tmp_path / "d", 48, 16)
    sets = [a for s in [t for t in TINY if not t.startswith("data.num_workers")]
            + ["train.checkpoint_every=3", "optim.schedule=constant"] for a in ("--set", s)]   # a resume changes max_steps

    def run(name, workers, steps, *extra):
        r = run_cli(["train", "--train-data", train, "--out", str(tmp_path / name), "--batch-size", "8",
                     "--max-steps", str(steps), *sets, "--set", f"data.num_workers={workers}", *extra])
        assert r.exit_code == 0, r.output
        return r.output

    def final(name):
        return VQVAE.from_pretrained(str(tmp_path / name / "final")).state_dict()

    run("zero", 0, 7)        # 6 batches an epoch: step 7 is in epoch 1
    run("one", 1, 7)
    a, b = final("zero"), final("one")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run("switch", 0, 3)
    out = run("switch", 1, 7, "--resume")
    assert "starts epoch" not in out                  # the position carried over
    c = final("switch")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_trains_under_autocast_only_where_the_cpu_has_bf16_instructions(tmp_path, monkeypatch):
    from pipelines import distributed as D
    train = write_shards(tmp_path / "d", 32, 16)
    sets = [a for s in TINY for a in ("--set", s)]

    def run(name, native, bf16):
        monkeypatch.setattr(D, "native_bf16", lambda device: native)
        r = run_cli(["train", "--train-data", train, "--out", str(tmp_path / name), "--batch-size", "8",
                     "--max-steps", "4", *sets, "--set", f"train.bf16={bf16}"])
        assert r.exit_code == 0, r.output
        return r.output, VQVAE.from_pretrained(str(tmp_path / name / "final")).state_dict()

    out32, fp32 = run("fp32", True, "false")
    assert "train in fp32" in out32
    out_plain, plain = run("no-instructions", False, "true")      # asked for, but not native here
    assert "train in fp32" in out_plain and all(torch.equal(fp32[k], plain[k]) for k in fp32)
    out16, bf16 = run("bf16", True, "true")
    assert "bf16 autocast" in out16
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())           # weights stay fp32
    assert all(torch.isfinite(v.float()).all() for v in bf16.values())
    assert not all(torch.equal(fp32[k], bf16[k]) for k in fp32)             # it did run in bf16


def test_native_bf16_asks_the_cpu_and_trusts_cuda(monkeypatch):
    from pipelines.distributed import native_bf16
    assert native_bf16(torch.device("cuda", 0)) and not native_bf16(torch.device("meta"))
    for avx512_bf16, amx, want in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert native_bf16(torch.device("cpu")) == want
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")       # a torch without the probe
    assert not native_bf16(torch.device("cpu"))
