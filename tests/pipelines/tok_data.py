"""Test data for the tokenize tests: Fashion-MNIST shards, odd and broken samples and shards,
a tiny k-means-initialised tokenizer (random weights, but codes that vary with the image)."""
from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import torch
from PIL import Image

from tokenizer import VQVAE, QuantizerConfig, VQVAEConfig

FMNIST = "/usr/share/datasets/fashion-mnist"


def fashion_mnist(n: int, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) labels, the first n of the split."""
    with gzip.open(f"{FMNIST}/{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(f"{FMNIST}/{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return images.copy(), labels.copy()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")   # uint16 arrays become 16-bit grey ("I;16")
    return buf.getvalue()


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """[(key, {ext: bytes})] -> a WebDataset tar (with the end-of-archive marker)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def fmnist_samples(images: np.ndarray, labels: np.ndarray, prefix: str, start: int = 0):
    return [(f"{prefix}{start + i:06d}", {"png": png(img), "cls": str(int(lab)).encode()})
            for i, (img, lab) in enumerate(zip(images, labels))]


def write_fmnist_shards(directory, n_shards: int, per_shard: int, prefix: str = "train") -> dict:
    """Shards DIR/{prefix}-00000i.tar; returns {key: (image, label)} of every sample."""
    images, labels = fashion_mnist(n_shards * per_shard)
    truth = {}
    for s in range(n_shards):
        lo = s * per_shard
        samples = fmnist_samples(images[lo:lo + per_shard], labels[lo:lo + per_shard], f"s{s}-", lo)
        write(os.path.join(directory, f"{prefix}-{s:06d}.tar"), tar_bytes(samples))
        for (key, _), img, lab in zip(samples, images[lo:lo + per_shard], labels[lo:lo + per_shard]):
            truth[key] = (img, int(lab))
    return truth


def save_tokenizer(path, seed: int = 0, codebook_size: int = 64) -> VQVAE:
    """A tiny 28x28 grey tokenizer whose codebook is k-means of real latents (varied codes)."""
    torch.manual_seed(seed)
    config = VQVAEConfig(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=1,
                         code_dim=8, quantizer=QuantizerConfig(codebook_size=codebook_size, kmeans_iters=3))
    model = VQVAE(config)
    images, _ = fashion_mnist(256, "train")
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images[:, None]).float() / 255.0)
    model.eval()
    model.save_pretrained(str(path))
    return model


def vqtok(args: list[str], env: dict | None = None, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (its own Ray driver)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RAY_ADDRESS", None) if "RAY_ADDRESS" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "pipelines", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def odd_samples() -> tuple[list, set[str], dict[str, str]]:
    """A shard's worth of odd-but-valid and broken samples.
    Returns (samples, keys expected ok, {key: expected failure reason})."""
    rng = np.random.default_rng(0)
    images, labels = fashion_mnist(4)
    good = fmnist_samples(images, labels, "good-")
    photo = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90 CW on display
    ok = {
        "grey16": {"png": png(rng.integers(0, 65536, (28, 28)).astype(np.uint16)), "cls": b"1"},
        "cmyk": {"jpg": encode_image(Image.fromarray(photo).convert("CMYK"), "JPEG"), "cls": b"2"},
        "palette": {"png": encode_image(Image.fromarray(photo).convert("P"), "PNG", transparency=0), "cls": b"3"},
        "rgba": {"png": encode_image(Image.fromarray(np.dstack([photo, photo[..., :1]])), "PNG"), "cls": b"4"},
        "greyjpg": {"jpeg": encode_image(Image.fromarray(photo[..., 0]), "JPEG"), "cls": b"5"},
        "huge": {"jpg": encode_image(Image.fromarray(photo).resize((4000, 3000)), "JPEG", quality=50),
                 "cls": b"6"},
        "wide": {"png": png(rng.integers(0, 256, (20, 70), dtype=np.uint8)), "cls": b"7"},
        "exif": {"jpg": encode_image(Image.fromarray(photo), "JPEG", exif=exif), "cls": b"8"},
        "webp": {"webp": encode_image(Image.fromarray(photo), "WEBP"), "cls": b"9"},
    }
    full_png = png(images[0])
    bad = {
        "empty": ({"png": b"", "cls": b"0"}, "empty_image"),
        "garbage": ({"png": rng.bytes(300), "cls": b"0"}, "undecodable_image"),
        "truncated": ({"png": full_png[: len(full_png) // 2], "cls": b"0"}, "undecodable_image"),
        "noimage": ({"cls": b"0"}, "no_image"),
        "textonly": ({"txt": b"a caption and nothing else"}, "no_image"),
        "badcls": ({"png": full_png, "cls": b"not-a-number"}, "bad_kept_field"),
    }
    samples = good[:2] + list(ok.items()) + [(k, v[0]) for k, v in bad.items()] + good[2:]
    samples.append(("good-000000", {"png": full_png, "cls": b"0"}))   # a duplicate key
    expected_ok = {k for k, _ in good} | set(ok)
    reasons = {k: r for k, (_, r) in bad.items()}
    return samples, expected_ok, reasons


def hostile_shard() -> tuple[bytes, list[str], dict[str, str]]:
    """A shard of crafted members, each of which once vanished or cost the whole shard.
    Returns (tar bytes, keys expected ok in order, {printable key: expected reason})."""
    images, labels = fashion_mnist(3)
    good = [png(images[i]) for i in range(3)]
    members: list[tuple[str, bytes | str, str]] = [      # (name, data or link target, kind)
        ("ok-0.png", good[0], "file"), ("ok-0.cls", b"0", "file"),
        ("caf\udce9.png", good[1], "file"),              # the name's byte 0xe9 is not UTF-8
        ("twice.png", good[0], "file"), ("twice.png", good[1], "file"),
        ("ok-1.png", good[1], "file"), ("ok-1.cls", b"1", "file"),
        ("symlink.png", "ok-0.png", "symlink"), ("hardlink.png", "ok-0.png", "hardlink"),
        ("fifo.png", b"", "fifo"), (".hidden.png", good[2], "file"), ("README", b"notes", "file"),
        ("sub/.DS_Store", b"x", "file"),
        ("ok-2.png", good[2], "file"), ("ok-2.cls", b"2", "file"),
        ("ok-0.jpg", good[0], "file"),                  # the key 'ok-0' again, not adjacent
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind != "fifo":
                info.linkname = data
            tar.addfile(info)
    reasons = {"caf\\xe9": "invalid_key", "twice": "duplicate_field", "symlink": "unsupported_member",
               "hardlink": "unsupported_member", "fifo": "unsupported_member",
               ".hidden.png": "stray_member", "README": "stray_member", "sub/.DS_Store": "stray_member",
               "ok-0": "duplicate_key"}
    return buf.getvalue(), ["ok-0", "ok-1", "ok-2"], reasons


def _member_data_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name).offset_data


def _end_of_members(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def broken_shards(directory) -> dict[str, dict]:
    """Damaged shards in DIR; returns {shard name: {"ok": keys, "errors": {key: reason}, "shard_error": bool}}."""
    images, labels = fashion_mnist(30, "train")
    samples = fmnist_samples(images, labels, "b-")
    whole = tar_bytes(samples[:10])
    # cut inside the 8th sample's png data: samples 0..6 complete, sample 7 damaged
    members = tar_bytes(samples[10:20])
    cut_at = _member_data_offset(members, samples[17][0] + ".png") + 100   # inside the 8th sample's png
    # cut at a block boundary right after the 5th sample, without the end-of-archive marker
    head5 = tar_bytes(samples[20:25])
    no_marker = head5[: _end_of_members(head5)]
    write(os.path.join(directory, "whole.tar"), whole)
    write(os.path.join(directory, "cut.tar"), members[:cut_at])
    write(os.path.join(directory, "blockcut.tar"), no_marker)
    write(os.path.join(directory, "nontar.tar"), b"this is not a tar archive\n" * 40)
    write(os.path.join(directory, "zerobytes.tar"), b"")
    write(os.path.join(directory, "emptytar.tar"), tar_bytes([]))
    keys = [k for k, _ in samples]
    return {
        "whole": {"ok": set(keys[:10]), "errors": {}, "shard_error": False},
        "cut": {"ok": set(keys[10:17]), "errors": {keys[17]: "incomplete_sample"}, "shard_error": True},
        "blockcut": {"ok": set(keys[20:24]), "errors": {keys[24]: "incomplete_sample"}, "shard_error": True},
        "nontar": {"ok": set(), "errors": {}, "shard_error": True},
        "zerobytes": {"ok": set(), "errors": {}, "shard_error": True},
        "emptytar": {"ok": set(), "errors": {}, "shard_error": False},
    }


def expected_codes(tok_dir: str, truth: dict) -> dict[str, list[int]]:
    """key -> the codes a one-thread CodeEncoder gives the key's image."""
    from pipelines.tokenize.encoder import CodeEncoder
    keys = sorted(truth)
    enc = CodeEncoder(tok_dir, threads=1)
    codes = enc.encode(np.stack([truth[k][0][None] for k in keys]))
    return {k: c.tolist() for k, c in zip(keys, codes)}


def shard_set(directory, tok_dir: str, n_shards: int, per_shard: int) -> dict:
    """Fashion-MNIST shards DIR/train-00000i.tar: {'dir', 'pattern', 'truth': key -> (image,
    label), 'codes': key -> expected codes}."""
    truth = write_fmnist_shards(directory, n_shards, per_shard)
    return {"dir": str(directory), "pattern": f"{directory}/train-{{000000..{n_shards - 1:06d}}}.tar",
            "truth": truth, "codes": expected_codes(tok_dir, truth)}
