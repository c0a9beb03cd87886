"""Training augmentation (pipelines/train/augment.py): what each option does to pixels, its
draws per (seed, rank, step), its config keys, and a resumed run augmenting as an unbroken one."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.train.augment import AugmentConfig, augment, augment_generator
from pipelines.train.config import resolve_config
from tokenizer import ConfigError

from test_train import TINY, write_shards


def images(n=32, c=3, side=8):
    torch.manual_seed(0)
    return torch.rand(n, c, side, side)


def dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and turns of one (C, H, W) image."""
    return [torch.rot90(v, k, (1, 2)) for v in (img, img.flip(-1)) for k in range(4)]


def matches(a: torch.Tensor, candidates) -> int:
    return sum(torch.allclose(a, c, atol=1e-6) for c in candidates)


def test_off_by_default_and_the_identity():
    x = images()
    assert not AugmentConfig().enabled
    assert augment(x, AugmentConfig(), augment_generator(0, 0, 0)) is x


@pytest.mark.parametrize("cfg, kinds", [
    (AugmentConfig(flip=True), {"flip"}),
    (AugmentConfig(rot90=True), {"turn"}),
    (AugmentConfig(flip=True, rot90=True), {"flip", "turn"}),
])
def test_flips_and_turns_move_pixels_exactly(cfg, kinds):
    x = images(64)
    y = augment(x, cfg, augment_generator(3, 0, 7))
    seen = set()
    for i in range(len(x)):
        cands = dihedral(x[i])
        assert matches(y[i], cands) == 1, i             # exactly one of the 8, pixel for pixel
        which = next(j for j, c in enumerate(cands) if torch.allclose(y[i], c, atol=1e-6))
        if which in (1, 2, 3, 5, 7) or (which == 6 and "flip" not in kinds):
            seen.add("turn")
        if which >= 4 or which == 2:
            seen.add("flip")
    # flips only give the identity, the two mirror images and the half turn (both flips)
    assert seen >= kinds
    changed = sum(not torch.equal(y[i], x[i]) for i in range(len(x)))
    assert changed > len(x) // 2


def test_crop_jitter_zooms_into_a_part_of_the_image():
    side = 16
    ramp = torch.linspace(0, 1, side)
    x = ramp.expand(32, 1, side, side).clone()            # brightness rises left to right
    y = augment(x, AugmentConfig(min_crop_area=0.25), augment_generator(0, 0, 0))
    span = y[:, 0, 0, -1] - y[:, 0, 0, 0]
    # each output still rises left to right, over a part of the input's range: a zoom, not a flip
    assert (y[:, :, :, 1:] >= y[:, :, :, :-1] - 1e-6).all()
    assert (span < 0.99).all() and (span > 0.4).all()
    assert y.min() >= 0 and y.max() <= 1
    assert len({round(float(s), 3) for s in span}) > 16   # sizes and places differ per image
    const = torch.full((4, 3, side, side), 0.3)
    torch.testing.assert_close(augment(const, AugmentConfig(min_crop_area=0.2), augment_generator(0, 0, 1)), const)


def test_crop_prob_leaves_the_other_images_unresampled():
    x = torch.rand(400, 3, 16, 16)
    gen = lambda: augment_generator(3, 0, 7)
    y = augment(x, AugmentConfig(min_crop_area=0.5, crop_prob=0.25), gen())
    whole = torch.tensor([torch.allclose(y[i], x[i], rtol=0, atol=1e-5) for i in range(len(x))])
    # about 3/4 keep their pixels (to fp32 rounding of the sampling grid); the cropped are resampled
    assert 0.65 < whole.float().mean() < 0.85, whole.float().mean()
    assert all(not torch.allclose(y[i], x[i], atol=1e-3) for i in torch.nonzero(~whole).flatten())
    # 0 turns the crop off
    assert torch.equal(augment(x, AugmentConfig(min_crop_area=0.5, crop_prob=0.0), gen()), x)
    # crop_prob 1 draws nothing extra: runs made before the key existed replay the same crops
    old = augment(x, AugmentConfig(min_crop_area=0.5), gen())
    assert torch.equal(old, augment(x, AugmentConfig(min_crop_area=0.5, crop_prob=1.0), gen()))
    with pytest.raises(ConfigError, match=r"data.augment.crop_prob = 1.5 must be in \[0, 1\]"):
        resolve_config(None, ["data.augment.crop_prob=1.5"], train_data=["x"])


def test_channel_shuffle_permutes_colours_per_image():
    x = torch.zeros(64, 3, 4, 4)
    x[:, 0], x[:, 1], x[:, 2] = 0.1, 0.5, 0.9
    y = augment(x, AugmentConfig(channel_shuffle=True), augment_generator(0, 0, 0))
    orders = {tuple(round(float(v), 1) for v in y[i, :, 0, 0]) for i in range(64)}
    assert all(sorted(o) == [0.1, 0.5, 0.9] for o in orders) and len(orders) == 6
    grey = torch.rand(8, 1, 4, 4)
    assert torch.equal(augment(grey, AugmentConfig(channel_shuffle=True), augment_generator(0, 0, 0)), grey)


def test_draws_depend_on_seed_rank_and_step_only():
    x = images()
    cfg = AugmentConfig(flip=True, rot90=True, min_crop_area=0.5, channel_shuffle=True)
    a = augment(x, cfg, augment_generator(1, 0, 5))
    torch.manual_seed(123)                                 # the global RNG plays no part
    assert torch.equal(a, augment(x, cfg, augment_generator(1, 0, 5)))
    for other in [(1, 1, 5), (1, 0, 6), (2, 0, 5)]:
        assert not torch.equal(a, augment(x, cfg, augment_generator(*other))), other


def test_config_keys_and_errors_name_the_key():
    cfg = resolve_config(None, ["data.augment.flip=true", "data.augment.min_crop_area=0.5"], train_data=["x"])
    assert cfg.data.augment == AugmentConfig(flip=True, min_crop_area=0.5)
    with pytest.raises(ConfigError, match=r"data.augment.min_crop_area = 0.0 must be in \(0, 1\]"):
        resolve_config(None, ["data.augment.min_crop_area=0"], train_data=["x"])
    with pytest.raises(ConfigError, match="unknown config key data.augment.hue"):
        resolve_config(None, ["data.augment.hue=1"], train_data=["x"])


def test_a_resumed_run_augments_as_the_unbroken_run(tmp_path):
    """Stopped after step 3 of 6 (its step-3 checkpoint), resumed: the same weights, codebook
    restarts included, as the run that never stopped; and the augmentation did change them."""
    train = write_shards(tmp_path / "d", 64, 16)
    aug = ["data.augment.flip=true", "data.augment.rot90=true", "data.augment.min_crop_area=0.5"]

    def run(out, *extra, settings=TINY + aug):
        sets = [a for s in settings + ["train.checkpoint_every=3"] for a in ("--set", s)]
        r = CliRunner().invoke(main, ["train", "--train-data", train, "--out", str(out), "--batch-size", "8",
                                      "--max-steps", "6", *sets, *extra])
        assert r.exit_code == 0, r.output
        return torch.load(out / "checkpoints" / "step-00000006.pt", weights_only=True)["model"]

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "broken")
    (tmp_path / "broken" / "checkpoints" / "step-00000006.pt").unlink()
    shutil.rmtree(tmp_path / "broken" / "final")
    resumed = run(tmp_path / "broken", "--resume")
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    plain = run(tmp_path / "plain", settings=TINY)
    assert not torch.equal(plain["quantizer.codebook"], whole["quantizer.codebook"])
