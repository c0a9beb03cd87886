"""vqtok decode / eval / inspect through the CLI, on outputs of a real (tiny) tokenizer."""
import json
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from codes_output import png_bytes, save_tiny_model, write_output, write_tar
from pipelines import output_format as fmt
from pipelines.cli import main
from pipelines.decode import safe_name

HOSTILE_KEYS = ["../escape", "../../../../tmp/vqtok-escape", "/abs/olute", "nested/dir/key", "a\x00b",
                "x" * 5000, "é" * 300, ".", "..", "", "_hidden", ".hidden", "%2E", "normal-000001",
                "sub/../../up", "back\\slash", "new\nline"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return str(path), save_tiny_model(path)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def png_array(path):
    with Image.open(path) as img:
        return np.asarray(img)


def expected_pixels(model, codes):
    x = model.decode(torch.as_tensor(codes)[None])[0]        # (C, H, W)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()[0]


def files_under(root):
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def test_decode_writes_one_png_per_row_equal_to_model_decode(tmp_path, tok):
    tok_dir, model = tok
    rows = write_output(tmp_path / "codes", model, {"s0": 5, "s1": 4})
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 0, result.output
    assert "decoded 9 images" in result.stdout
    index = [json.loads(line) for line in open(tmp_path / "png" / "_index.jsonl")]
    assert sorted(e["key"] for e in index) == sorted(rows)
    assert len(files_under(tmp_path / "png")) == len(rows) + 1
    for entry in index:
        assert entry["file"] == f"{entry['shard']}/{entry['key']}.png"
        np.testing.assert_array_equal(png_array(tmp_path / "png" / entry["file"]),
                                      expected_pixels(model, rows[entry["key"]]["codes"]))


def test_decode_limit(tmp_path, tok):
    tok_dir, model = tok
    write_output(tmp_path / "codes", model, {"s0": 5, "s1": 4})
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png",
                 "--limit", 3)
    assert result.exit_code == 0, result.output
    assert len([f for f in files_under(tmp_path / "png") if f.endswith(".png")]) == 3


def fail_nth_rename(monkeypatch, n):
    """The n-th atomic publish (tokenizer.storage's os.replace) fails, as a full disk would."""
    from tokenizer import storage
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(storage.os, "replace", replace)
    return calls


def test_decode_publishes_every_file_atomically_the_index_last(tmp_path, tok, monkeypatch):
    tok_dir, model = tok
    rows = write_output(tmp_path / "codes", model, {"s0": 5})
    calls = fail_nth_rename(monkeypatch, 4)
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code != 0 and "No space left" in str(result.exception)
    assert not any(c.endswith("_index.jsonl") for c in calls)     # the index waits for every PNG
    written = files_under(tmp_path / "png")       # hidden temp files would show here too
    assert len(written) == len(calls) - 1 >= 3 and all(f.endswith(".png") for f in written)
    for f in written:
        key = os.path.basename(f)[:-len(".png")]
        np.testing.assert_array_equal(png_array(f), expected_pixels(model, rows[key]["codes"]))
    monkeypatch.undo()
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 0, result.output
    assert len(files_under(tmp_path / "png")) == 5 + 1


def test_untrusted_keys_never_write_outside_out(tmp_path, tok):
    tok_dir, model = tok
    work = tmp_path / "work"
    rows = write_output(tmp_path / "codes", model, {"s0": len(HOSTILE_KEYS)}, keys={"s0": HOSTILE_KEYS})
    before = files_under(tmp_path)
    out = work / "deep" / "out"
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", out)
    assert result.exit_code == 0, result.output
    new = files_under(tmp_path) - before
    assert all(os.path.realpath(f).startswith(str(out.resolve()) + os.sep) for f in new)
    assert not os.path.exists("/tmp/vqtok-escape.png") and not os.path.exists(work / "escape.png")
    pngs = [f for f in new if f.endswith(".png")]
    assert len(pngs) == len(HOSTILE_KEYS)                        # distinct keys, distinct files
    assert all(len(os.path.basename(f).encode()) <= 255 for f in pngs)
    index = {e["key"]: e["file"] for e in map(json.loads, open(out / "_index.jsonl"))}
    assert set(index) == set(HOSTILE_KEYS)
    for key in HOSTILE_KEYS:
        np.testing.assert_array_equal(png_array(out / index[key]), expected_pixels(model, rows[key]["codes"]))
    # the keys in the Parquet are kept exactly as they came
    assert pq.read_table(fmt.data_path(str(tmp_path / "codes"), "s0")).column("key").to_pylist() == HOSTILE_KEYS


def test_safe_name_is_one_injective_file_name():
    keys = ["a", "a/b", "a%2Fb", "../a", ".", "..", "", "_x", "%5Fx", "a\x00", "a\n", "x" * 400,
            "x" * 401, "é" * 200, "\udcff"]
    names = [safe_name(k) for k in keys]
    assert len(set(names)) == len(keys)                            # injective
    for name in names:
        assert "/" not in name and "\x00" not in name and not name.startswith((".", "_"))
        assert 0 < len(name.encode()) <= 200


def test_decode_refuses_a_symlink_planted_in_out(tmp_path, tok):
    tok_dir, model = tok
    write_output(tmp_path / "codes", model, {"s0": 2})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "png").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "png" / "s0")
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 1 and "outside the output directory" in result.output
    assert os.listdir(tmp_path / "elsewhere") == []


def test_decode_refuses_a_different_tokenizer(tmp_path, tok):
    tok_dir, model = tok
    write_output(tmp_path / "codes", model, {"s0": 2})
    other = tmp_path / "other-tok"
    save_tiny_model(other, seed=1)
    result = run("decode", "--tokenizer", other, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "differ from the tokenizer_sha256" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "png").exists()




def test_eval_reports_exact_metrics_and_draws_pngs(tmp_path, tok):
    tok_dir, model = tok
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(7)]
    write_tar(tmp_path / "shard-000000.tar", [(f"{i:04d}.png", png_bytes(a)) for i, a in enumerate(arrays[:4])]
         + [("bad.png", b"not an image"), ("text.txt", b"no image here")])
    write_tar(tmp_path / "shard-000001.tar", [(f"{i:04d}.png", png_bytes(a)) for i, a in enumerate(arrays[4:], 4)])
    result = run("eval", "--tokenizer", tok_dir, "--input", tmp_path / "shard-{000000..000001}.tar",
                 "--out", tmp_path / "report", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    x = torch.stack([torch.from_numpy(a).float()[None] / 255 for a in arrays])
    codes = model.encode(x)
    mse = ((model.decode(codes) - x) ** 2).flatten(1).mean(1)
    counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    assert got["images"] == 7 and got["skipped"] == 2
    assert got["mean_psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-3)
    assert "psnr" not in got
    assert got["usage"] == pytest.approx(float((counts > 0).double().mean()), abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), abs=1e-3)
    with Image.open(tmp_path / "report" / "reconstructions.png") as grid:
        assert grid.size[0] >= 7 * 64 and grid.size[1] >= 2 * 64
    with Image.open(tmp_path / "report" / "code_usage.png") as hist:
        assert hist.format == "PNG" and hist.size[0] >= 200
    metrics = json.load(open(tmp_path / "report" / "metrics.json"))
    assert metrics["counts"] == counts.long().tolist()


def test_eval_publishes_its_files_atomically_metrics_last(tmp_path, tok, monkeypatch):
    tok_dir, _ = tok
    rng = np.random.default_rng(1)
    write_tar(tmp_path / "s.tar", [(f"{i}.png", png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
                                   for i in range(3)])
    calls = fail_nth_rename(monkeypatch, 3)
    result = run("eval", "--tokenizer", tok_dir, "--input", tmp_path / "s.tar", "--out", tmp_path / "report")
    assert result.exit_code != 0 and [os.path.basename(c) for c in calls] == [
        "reconstructions.png", "code_usage.png", "metrics.json"]
    assert sorted(os.listdir(tmp_path / "report")) == ["code_usage.png", "reconstructions.png"]


def test_eval_names_a_block_aligned_truncated_shard(tmp_path, tok):
    import tarfile
    tok_dir, _ = tok
    rng = np.random.default_rng(1)
    write_tar(tmp_path / "cut.tar", [(f"{i:04d}.png", png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
                                     for i in range(5)])
    with tarfile.open(tmp_path / "cut.tar") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    data = (tmp_path / "cut.tar").read_bytes()[:end]        # no end-of-archive marker: tarfile reads it silently
    (tmp_path / "cut.tar").write_bytes(data)
    result = run("eval", "--tokenizer", tok_dir, "--input", tmp_path / "cut.tar", "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["images"] == 4 and got["skipped"] == 1       # the last sample may be cut: not used
    (url, why), = got["damaged_shards"].items()
    assert url.endswith("cut.tar") and "no end-of-archive marker" in why
    assert "cut.tar" in result.stderr and "no end-of-archive marker" in result.stderr


def test_eval_without_readable_images_is_a_clear_error(tmp_path, tok):
    tok_dir, _ = tok
    write_tar(tmp_path / "s.tar", [("a.png", b"garbage")])
    result = run("eval", "--tokenizer", tok_dir, "--input", tmp_path / "s.tar", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "no decodable image" in result.output
    result = run("eval", "--tokenizer", tok_dir, "--input", tmp_path / "missing-*.tar", "--out", tmp_path / "r")
    assert result.exit_code == 1 and result.output.startswith("Error: ")


def test_inspect_reports_rows_shards_errors_and_tokenizer(tmp_path, tok):
    _, model = tok
    out = tmp_path / "codes"
    write_output(out, model, {"s0": 5, "s1": 3, "s2": 0},
                 errors={"s1": [("k1", "undecodable_image: cannot identify"), ("k2", "undecodable_image: x"),
                                ("k3", "no_image: text only")],
                         "s2": [(None, "truncated tar: unexpected end of data")]})
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["rows"] == 8 and info["data_files"] == 3 and info["complete"] is True
    assert info["shards_done"] == 3 and info["shards_failed"] == 1 and info["failed_shards"] == ["s2"]
    assert info["errors"] == 4
    assert info["errors_by_reason"] == {"undecodable_image": 2, "no_image": 1, "shard_error": 1}
    assert info["samples_read"] == 8 + 3 and info["stage_seconds"]["encode"] == pytest.approx(0.9)
    assert info["tokenizer_sha256"] == model.weights_sha256()
    assert info["grid"] == list(model.grid) and info["codebook_size"] == model.codebook_size
    text = run("inspect", out).stdout
    assert "3 done, 1 failed" in text and model.weights_sha256() in text and "complete" in text
    assert f"{model.grid[0]} x {model.grid[1]} codes, codebook size {model.codebook_size}" in text
    assert info["uncommitted_shards"] == []
    os.remove(fmt.success_path(str(out)))
    os.remove(fmt.manifest_path(str(out), "s0"))
    text = run("inspect", out).stdout
    assert "INCOMPLETE" in text and "2 done" in text and "without a manifest" in text
    assert json.loads(run("inspect", out, "--json").stdout)["uncommitted_shards"] == ["s0"]


def test_inspect_counts_as_shards_only_committed_top_level_data_files(tmp_path, tok):
    """The one rule of what a shard is (resume and verify use it too): OUTPUT/<shard>.parquet
    with OUTPUT/_manifest/<shard>.json. A manifest whose data file is gone is no finished shard;
    a .parquet file in a subfolder is read by readers (rows) but is no shard at all."""
    _, model = tok
    out = tmp_path / "codes"
    write_output(out, model, {"s0": 2, "s1": 3, "s2": 4})
    os.remove(fmt.data_path(str(out), "s2"))
    os.makedirs(out / "sub")
    shutil.copy(fmt.data_path(str(out), "s0"), out / "sub" / "copy.parquet")
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["shards_done"] == 2 and info["uncommitted_shards"] == []
    assert info["data_files"] == 3 and info["rows"] == 2 + 3 + 2
    assert info["samples_read"] == 2 + 3


def test_inspect_of_a_non_output_is_a_clear_error(tmp_path):
    result = run("inspect", tmp_path / "nothing")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "nothing" in result.output


def test_decode_keeps_the_first_of_a_repeated_key_and_says_so(tmp_path, tok):
    tok_dir, model = tok
    write_output(tmp_path / "codes", model, {"s0": 3}, keys={"s0": ["a", "b", "a"]})
    result = run("decode", "--tokenizer", tok_dir, "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 0, result.output
    assert "1 rows repeat a (shard, key)" in result.output and "decoded 2 images" in result.stdout
    assert sorted(os.listdir(tmp_path / "png" / "s0")) == ["a.png", "b.png"]


def test_decode_rgb_tokenizer_writes_rgb_pngs(tmp_path):
    model = save_tiny_model(tmp_path / "tok", channels=3, codebook_size=40000)   # K > 32768: int32 codes
    rows = write_output(tmp_path / "codes", model, {"s0": 2})
    assert pq.read_schema(fmt.data_path(str(tmp_path / "codes"), "s0")).field("codes").type.value_type == pa.int32()
    result = run("decode", "--tokenizer", tmp_path / "tok", "--codes", tmp_path / "codes", "--out", tmp_path / "png")
    assert result.exit_code == 0, result.output
    for key, row in rows.items():
        got = png_array(tmp_path / "png" / "s0" / f"{key}.png")
        want = model.decode(torch.as_tensor(row["codes"])[None])[0]
        want = (want.clamp(0, 1) * 255).round().to(torch.uint8).numpy().transpose(1, 2, 0)
        assert got.shape == (8, 8, 3)
        np.testing.assert_array_equal(got, want)


def input_args(command: str, tmp_path, model) -> list:
    """What `vqtok eval` (a shard) or `vqtok decode` (an output) reads, made in tmp_path."""
    if command == "eval":
        write_tar(tmp_path / "s.tar", [("a.png", png_bytes(np.zeros((28, 28), np.uint8)))])
        return ["--input", tmp_path / "s.tar"]
    write_output(tmp_path / "codes", model, {"s0": 2})
    return ["--codes", tmp_path / "codes"]


@pytest.mark.parametrize("command", ["eval", "decode"])
def test_a_tokenizer_config_of_the_wrong_type_is_a_one_line_error(tmp_path, tok, command):
    tok_dir, model = tok
    bad = tmp_path / "bad-tok"
    bad.mkdir()
    for name in os.listdir(tok_dir):
        (bad / name).write_bytes(open(os.path.join(tok_dir, name), "rb").read())
    config = json.loads((bad / "config.json").read_text())
    config["model"]["quantizer"]["codebook_size"] = float(config["model"]["quantizer"]["codebook_size"])
    (bad / "config.json").write_text(json.dumps(config))
    args = input_args(command, tmp_path, model)
    result = run(command, "--tokenizer", bad, *args, "--out", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"Error: {bad / 'config.json'}: model.quantizer.codebook_size = ")
    assert "must be an integer" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("where,why", [
    ("file", "is a file, not a directory"),
    ("file/sub", "cannot be created, a parent of it is a file"),
    ("/proc/vqtok-no-such-dir", "cannot be created (No such file or directory)"),
    ("/proc", "files cannot be created in it"),        # exists, but no files can be made there
])
@pytest.mark.parametrize("command", ["eval", "decode"])
def test_an_unusable_out_is_a_one_line_error_naming_the_option(tmp_path, tok, command, where, why):
    tok_dir, model = tok
    (tmp_path / "file").write_text("not a directory")
    out = where if where.startswith("/") else str(tmp_path / where)
    args = input_args(command, tmp_path, model)
    result = run(command, "--tokenizer", tok_dir, *args, "--out", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"Error: --out {out}: {why}")
    assert len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "not a directory"
