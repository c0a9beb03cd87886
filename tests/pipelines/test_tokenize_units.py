"""Tokenize stage pieces without Ray: tar reading, preprocessing policy, deterministic encoding,
one shard end to end, output-directory claims."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tok_data as td
from pipelines.errors import UserError
from pipelines.output_format import read_metadata
from pipelines.tokenize import TokenizeConfig
from pipelines.tokenize.encoder import CodeEncoder
from pipelines.tokenize.outputs import OutputDir
from pipelines.tokenize.preprocess import ImageError, ImagePreprocessor
from pipelines.tokenize.shard_job import ShardTokenizer
from pipelines.tokenize.shards import TarShardReader
from pipelines.tokenize.tokenizer_info import tokenizer_metadata
from tokenizer import ConfigError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)


def test_reader_broken_shards_keep_readable_head_and_flag_damage(tmp_path):
    expected = td.broken_shards(tmp_path)
    for name, exp in expected.items():
        reader = TarShardReader(str(tmp_path / f"{name}.tar"))
        samples = list(reader)
        complete = {s.key for s in samples if s.complete}
        incomplete = {s.key for s in samples if not s.complete}
        assert complete == exp["ok"], name
        assert incomplete == set(exp["errors"]), name
        assert (reader.error is not None) == exp["shard_error"], (name, reader.error)
    reader = TarShardReader(str(tmp_path / "blockcut.tar"))
    list(reader)
    assert "no end-of-archive marker" in reader.error
    reader = TarShardReader(str(tmp_path / "nontar.tar"))
    list(reader)
    assert reader.error.startswith("not a tar archive")
    reader = TarShardReader(str(tmp_path / "missing.tar"))
    assert list(reader) == [] and reader.error == "shard not found"


def test_preprocess_converts_odd_modes_by_the_documented_policy():
    grey = ImagePreprocessor(1, 28)
    # 16-bit grey: 65535 -> 255, 257 -> 1
    a16 = np.full((28, 28), 257, np.uint16)
    a16[0, 0] = 65535
    out = grey(td.png(a16))
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[0, 5, 5] == 1
    # fully transparent RGBA is composited over white
    clear = np.zeros((28, 28, 4), np.uint8)
    assert (grey(td.encode_image(Image.fromarray(clear), "PNG")) == 255).all()
    # CMYK and palette end up as Pillow's own conversion to L
    photo = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    cmyk = Image.fromarray(photo).convert("CMYK")
    assert np.array_equal(grey(td.encode_image(cmyk, "TIFF"))[0], np.asarray(cmyk.convert("RGB").convert("L")))
    rgb = ImagePreprocessor(3, 28)(td.png(photo))
    assert rgb.shape == (3, 28, 28) and np.array_equal(rgb.transpose(1, 2, 0), photo)


def test_preprocess_resizes_shorter_side_and_centre_crops():
    wide = np.zeros((28, 84), np.uint8)
    wide[:, 28:56] = 200             # only the centre third is bright
    out = ImagePreprocessor(1, 28)(td.png(wide))[0]
    assert out.shape == (28, 28)
    assert out[:, 3:-3].min() >= 190  # the crop is the bright centre
    tall = np.zeros((112, 56), np.uint8)
    tall[28:84] = 255                 # 56x112 -> 28x56 -> centre 28 rows are the bright band
    out = ImagePreprocessor(1, 28)(td.png(tall))[0]
    assert out[2:-2].min() >= 250


def test_preprocess_applies_exif_orientation():
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :40] = 255                # left half white
    exif = Image.Exif()
    exif[0x0112] = 6                 # display rotated 90 degrees clockwise: white goes on top
    data = td.encode_image(Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    out = ImagePreprocessor(1, 40)(data)[0]   # displayed 40x80 (w x h) -> 40x40 centre crop
    rotated = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))
    assert rotated.shape == (80, 40)
    assert out[:15].mean() > 200 and out[-15:].mean() < 50   # top white, bottom black


@pytest.mark.parametrize("data,reason", [(b"", "empty_image"), (b"\x89PNG\r\n\x1a\nxxxx", "undecodable_image"),
                                         (b"GIF89a" + b"\0" * 10, "undecodable_image")])
def test_preprocess_rejects_bad_bytes_with_a_reason(data, reason):
    with pytest.raises(ImageError) as e:
        ImagePreprocessor(1, 28)(data, "png")
    assert e.value.reason == reason and "'png'" in str(e.value)


def test_codes_do_not_depend_on_batch_composition(tok_dir):
    images, _ = td.fashion_mnist(300)
    x = images[:, None]
    enc = CodeEncoder(tok_dir, threads=1)
    full = enc.encode(x)
    assert len(np.unique(full)) > 5   # the tokenizer really distinguishes images
    one_by_one = np.concatenate([enc.encode(x[i:i + 1]) for i in range(0, 70)])
    assert np.array_equal(full[:70], one_by_one)
    order = np.random.default_rng(0).permutation(300)
    shuffled = enc.encode(x[order])
    assert np.array_equal(full[order], shuffled)
    for step in (7, 65, 129):
        parts = np.concatenate([enc.encode(x[i:i + step]) for i in range(0, 300, step)])
        assert np.array_equal(full, parts), step
    enc2 = CodeEncoder(tok_dir, threads=2)
    assert np.array_equal(full, enc2.encode(x))


@pytest.mark.parametrize("decode_processes", [0, 2])   # inline (one-CPU CPU worker) and processes
def test_one_shard_end_to_end_rows_errors_manifest(tmp_path, tok_dir, decode_processes):
    samples, expected_ok, reasons = td.odd_samples()
    td.write(tmp_path / "odd.tar", td.tar_bytes(samples))
    meta = tokenizer_metadata(tok_dir)
    enc = CodeEncoder(tok_dir, threads=1)
    job = ShardTokenizer(enc, meta, str(tmp_path / "out"), ["cls"], batch_size=4,
                         decode_processes=decode_processes)
    try:
        manifest = job.run(str(tmp_path / "odd.tar"), "odd")
    finally:
        job.close()
    table = pq.read_table(tmp_path / "out" / "odd.parquet")
    assert sorted(table.column("key").to_pylist()) == sorted(expected_ok)
    assert set(table.column("shard").to_pylist()) == {"odd"}
    assert str(table.schema.field("codes").type) == "list<element: int16>"
    assert all(len(c) == 49 for c in table.column("codes").to_pylist())
    assert read_metadata(str(tmp_path / "out" / "odd.parquet")).tokenizer_sha256 == enc.sha256
    cls = dict(zip(table.column("key").to_pylist(), table.column("cls").to_pylist()))
    assert cls["cmyk"] == 2 and cls["webp"] == 9
    errors = pq.read_table(tmp_path / "out" / "_errors" / "odd.parquet").to_pylist()
    by_key = {e["key"]: e["error"] for e in errors}
    assert set(by_key) == set(reasons) | {"good-000000"}           # the duplicate key
    assert "duplicate key" in by_key["good-000000"] and "no image" in by_key["textonly"]
    counts = manifest["counts"]
    assert counts["read"] == len(samples) and counts["ok"] == len(expected_ok)
    assert counts["failed"] == len(reasons) + 1 and counts["shard_errors"] == 0
    expect_reasons = {}
    for r in list(reasons.values()) + ["duplicate_key"]:
        expect_reasons[r] = expect_reasons.get(r, 0) + 1
    assert counts["failed_by_reason"] == expect_reasons
    on_disk = json.loads((tmp_path / "out" / "_manifest" / "odd.json").read_text())
    assert on_disk["counts"] == counts and set(on_disk["durations_s"]) >= {"read", "decode", "encode", "write"}
    # codes equal a direct encode of the same decoded image
    good = [f for k, f in samples if k == "good-000001"][0]
    direct = enc.encode(ImagePreprocessor(1, 28)(good["png"])[None])[0]
    row = table.column("key").to_pylist().index("good-000001")
    assert table.column("codes")[row].as_py() == direct.tolist()
    assert not os.listdir(tmp_path / "out" / "_tmp")                # nothing left behind


def test_output_dir_refuses_another_tokenizer(tmp_path, tok_dir):
    other = tmp_path / "other"
    td.save_tokenizer(other, seed=1)
    meta_a, meta_b = tokenizer_metadata(tok_dir), tokenizer_metadata(str(other))
    assert meta_a.tokenizer_sha256 != meta_b.tokenizer_sha256
    out = OutputDir(str(tmp_path / "out"))
    out.prepare(meta_a, ["cls"], overwrite=False)
    out.prepare(meta_a, ["cls"], overwrite=False)       # same settings: fine
    with pytest.raises(UserError, match="different tokenizer_sha256"):
        OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=False)
    with pytest.raises(UserError, match="keep_fields"):
        OutputDir(str(tmp_path / "out")).prepare(meta_a, [], overwrite=False)
    (tmp_path / "out" / "x.parquet").write_bytes(b"old")
    OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=True)
    assert not (tmp_path / "out" / "x.parquet").exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="without a vqtok run record"):
        OutputDir(str(stranger)).prepare(meta_a, [], overwrite=False)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="tokenize.batch_size"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", batch_size=0)
    with pytest.raises(ConfigError, match="tokenize.keep_fields"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", keep_fields="codes")
    with pytest.raises(ConfigError, match="tokenize.max_error_rate"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", max_error_rate=2)
    assert TokenizeConfig(tokenizer="t", inputs="a.tar", output="o", keep_fields="cls, json").keep_fields == ["cls", "json"]


def test_storage_errors_propagate_but_damage_is_a_shard_error(tmp_path, monkeypatch):
    import fsspec
    td.write(tmp_path / "a.tar", td.tar_bytes([("k1", {"png": td.png(np.zeros((28, 28), np.uint8))})]))

    class Flaky(io.BytesIO):
        def read(self, *a):
            raise ConnectionResetError("connection reset by peer")

    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda url, mode="rb", **kw: type("F", (), {"open": lambda self: Flaky()})()
                        if url.endswith("flaky.tar") else real_open(url, mode, **kw))
    with pytest.raises(ConnectionResetError):     # retried by the driver, not judged as data
        list(TarShardReader(str(tmp_path / "flaky.tar")))
    reader = TarShardReader(str(tmp_path / "a.tar"))
    assert [s.key for s in reader] == ["k1"] and reader.error is None


def test_tokenize_driver_does_not_import_torch():
    # the driver only reads configs and schedules; torch's import (~1.5 s) belongs to the workers
    import subprocess
    import sys
    code = ("import sys, pipelines.cli, pipelines.cli.tokenize, pipelines.tokenize.driver, "
            "pipelines.tokenize.worker; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False"


def test_stop_autoscaler_monitor_kills_only_the_monitor(tmp_path):
    # the embedded cluster's monitor ignores SIGTERM; it is killed before ray.shutdown, and
    # nothing else is touched
    import signal
    import subprocess
    import sys
    from pipelines import ray_utils
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    monitor_path = tmp_path / "autoscaler" / "_private" / "monitor.py"
    monitor_path.parent.mkdir(parents=True)
    monitor_path.write_text(script)
    other_path = tmp_path / "log_monitor.py"
    other_path.write_text(script)
    monitor = subprocess.Popen([sys.executable, str(monitor_path)])
    other = subprocess.Popen([sys.executable, str(other_path)])
    try:
        assert ray_utils.stop_autoscaler_monitor() == 1
        assert monitor.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for proc in (monitor, other):
            proc.kill()
            proc.wait()
