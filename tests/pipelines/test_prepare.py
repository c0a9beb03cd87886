"""`vqtok prepare`: IDX reader, folder reader, atomic shard writer, expand_urls."""
from __future__ import annotations

import gzip
import io
import os
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.cli import main
from pipelines.shards.urls import expand_urls
from pipelines.shards.reader import TarShardReader
from pipelines.errors import UserError
from pipelines.prepare import FolderOptions, ShardWriter, prepare_fashion_mnist, prepare_folder, read_idx
from pipelines.prepare.fashion import DEFAULT_SOURCE, load_split

FASHION = DEFAULT_SOURCE


def test_read_idx_real_fashion_mnist_test_split():
    images = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert 20 < images.mean() < 120     # real clothing pictures, not zeros


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    raw = gzip.decompress(open(f"{FASHION}/t10k-labels-idx1-ubyte.gz", "rb").read())
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_idx(str(tmp_path / "short"))
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\nrest")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(str(tmp_path / "png"))


def wds_samples(urls: list[str]) -> list[dict]:
    """vqtok's shards as the webdataset library itself reads them."""
    import webdataset as wds
    return list(wds.WebDataset(list(urls), shardshuffle=False, empty_check=False))


def test_prepare_fashion_mnist_shards_hold_the_idx_pixels_and_labels(tmp_path):
    out = tmp_path / "fm"
    written = prepare_fashion_mnist(str(out), FASHION, shard_size=128, limit=300, progress=False)
    assert [os.path.basename(p) for p in written["train"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert len(written["test"]) == 3
    images, labels = load_split(FASHION, "train")
    samples = wds_samples(written["train"])
    assert len(samples) == 300 and len({s["__key__"] for s in samples}) == 300
    for i in (0, 137, 299):
        got = np.asarray(Image.open(io.BytesIO(samples[i]["png"])))
        np.testing.assert_array_equal(got, images[i])
        assert int(samples[i]["cls"]) == labels[i]
    # the shards are plain WebDataset: webdataset itself reads them
    import webdataset as wds
    keys = [s["__key__"] for s in wds.WebDataset(written["test"][0], shardshuffle=False)]
    assert len(keys) == 128


def test_prepare_cli_fashion_mnist_and_bad_source(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["prepare", "fashion-mnist", "--out", str(tmp_path / "o"), "--limit", "50",
                             "--shard-size", "20"])
    assert r.exit_code == 0, r.output
    assert "train: 3 shards" in r.output
    r = runner.invoke(main, ["prepare", "fashion-mnist", "--out", str(tmp_path / "o2"), "--source", str(tmp_path)])
    assert r.exit_code == 1
    assert "Error:" in r.output and "train-images-idx3-ubyte" in r.output and "Traceback" not in r.output


def test_shard_writer_never_leaves_a_partial_shard_under_its_final_name(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(out), "images-%06d.tar", shard_size=3) as w:
            for i in range(5):
                w.write({"__key__": f"k{i}", "png": b"x" * 100})
                if i == 3:
                    # shard 0 is complete; shard 1 is being written and not visible yet
                    assert (out / "images-000000.tar").exists()
                    assert not (out / "images-000001.tar").exists()
            raise RuntimeError("crash while writing shard 1")
    assert sorted(os.listdir(out)) == ["images-000000.tar"]      # no temp file, no partial shard
    with tarfile.open(out / "images-000000.tar") as tar:
        assert tar.getnames() == ["k0.png", "k1.png", "k2.png"]


def test_shard_writer_to_object_store_puts_whole_shards(tmp_path, s3_env):
    import s3fs
    fs = s3fs.S3FileSystem()
    fs.mkdir("vqtok-prepare")
    with ShardWriter("s3://vqtok-prepare/shards", "train-%06d.tar", shard_size=2) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "cls": str(i).encode()})
    urls = expand_urls(["s3://vqtok-prepare/shards/train-{000000..000001}.tar"])
    assert urls == ["s3://vqtok-prepare/shards/train-000000.tar", "s3://vqtok-prepare/shards/train-000001.tar"]
    assert [s.fields["cls"] for u in urls for s in TarShardReader(u)] == [b"0", b"1", b"2"]


def _photo(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_prepare_folder_crops_holds_out_and_skips_unreadable(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "a" / "contents" / "images").mkdir(parents=True)
    (src / "b").mkdir()
    _photo(src / "a" / "contents" / "images" / "small.png", 40, 30, 0)
    _photo(src / "a" / "contents" / "images" / "large.jpg", 120, 80, 1)
    _photo(src / "b" / "one.png", 64, 64, 2)
    _photo(src / "c.png", 50, 70, 3)
    (src / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    opts = FolderOptions(size=16, crops_per_image=5, short_side=48, largest_per_dir=False, holdout=1,
                         seed=0, shard_size=7)
    result = prepare_folder(str(src), str(tmp_path / "out"), opts, progress=False)
    assert [p for p, _ in result["skipped"]] == [str(src / "b" / "broken.jpg")]
    assert "broken.jpg" in capsys.readouterr().err
    assert result["counts"] == {"images": 15, "holdout": 5}
    samples, held = wds_samples(result["images"]), wds_samples(result["holdout"])
    assert len(samples) == 15 and len(held) == 5
    for s in samples + held:
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (16, 16) and img.mode == "RGB"
    import json
    sources = {json.loads(s["json"])["source"] for s in samples}
    assert not sources & {json.loads(s["json"])["source"] for s in held}   # held-out photos unseen


def test_prepare_folder_largest_per_dir_and_resize(tmp_path):
    src = tmp_path / "w"
    (src / "x").mkdir(parents=True)
    _photo(src / "x" / "640.png", 64, 40, 0)
    _photo(src / "x" / "1280.png", 128, 80, 1)
    r = CliRunner().invoke(main, ["prepare", "folder", str(src), "--out", str(tmp_path / "o"),
                                  "--size", "8", "--largest-per-dir"])
    assert r.exit_code == 0, r.output
    samples = wds_samples(expand_urls([str(tmp_path / "o")]))
    assert len(samples) == 1 and b"1280.png" in samples[0]["json"]
    assert Image.open(io.BytesIO(samples[0]["png"])).size == (8, 8)


def test_expand_urls_braces_globs_dirs_and_errors(tmp_path):
    for i in range(3):
        (tmp_path / f"d-{i:06d}.tar").write_bytes(b"")
    names = lambda urls: [os.path.basename(u) for u in urls]
    assert names(expand_urls([str(tmp_path / "d-{000000..000001}.tar")])) == ["d-000000.tar", "d-000001.tar"]
    assert len(expand_urls([str(tmp_path / "*.tar"), str(tmp_path / "d-000000.tar")])) == 3   # de-duplicated
    assert len(expand_urls([str(tmp_path)])) == 3
    with pytest.raises(UserError, match="no shard matches"):
        expand_urls([str(tmp_path / "e-*.tar")])
    with pytest.raises(UserError, match="d-000003.tar does not exist"):
        expand_urls([str(tmp_path / "d-{000000..000003}.tar")])


def test_prepare_folder_whole_images_have_the_pixels_tokenize_makes(tmp_path):
    """One image policy: EXIF orientation, alpha over white, shorter-side resize, centre crop."""
    from pipelines.images import ImagePreprocessor
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                          # rotate 90 CW on display
    Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(src / "b.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(src / "c.pgm")
    opts = FolderOptions(size=16, crops_per_image=0, shard_size=10)
    result = prepare_folder(str(src), str(tmp_path / "out"), opts, progress=False)
    samples = wds_samples(result["images"])
    assert len(samples) == 3 and not result["skipped"]
    policy = ImagePreprocessor(3, 16)
    for s in samples:
        import json
        source = json.loads(s["json"])["source"]
        expected = policy(open(source, "rb").read(), source)             # (3, 16, 16)
        got = np.asarray(Image.open(io.BytesIO(s["png"]))).transpose(2, 0, 1)
        np.testing.assert_array_equal(got, expected)
