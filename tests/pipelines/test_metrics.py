"""pipelines/metrics.py against hand computations."""
import math

import pytest
import torch

from pipelines.metrics import (MSE_FLOOR, code_counts, codebook_usage, mean_psnr, per_image_mse,
                               perplexity, psnr_of_mean_mse)


def test_the_two_psnrs_differ_as_computed_by_hand():
    # two 1-pixel images: errors 0.1 and 0.01 -> MSEs 0.01 and 0.0001
    x = torch.zeros(2, 1, 1, 1)
    x_hat = torch.tensor([0.1, 0.01]).reshape(2, 1, 1, 1)
    mse = per_image_mse(x, x_hat)
    assert mse.tolist() == pytest.approx([0.01, 0.0001])
    # PSNR of the mean MSE: 10 log10(1 / 0.00505) = 22.967 dB
    assert psnr_of_mean_mse(float(mse.mean())) == pytest.approx(10 * math.log10(1 / 0.00505))
    assert psnr_of_mean_mse(float(mse.mean())) == pytest.approx(22.9671, abs=1e-4)
    # mean of the per-image PSNRs: (20 + 40) / 2 = 30 dB
    assert mean_psnr(mse) == pytest.approx(30.0)


def test_per_image_mse_averages_each_image_over_channels_and_pixels():
    x = torch.zeros(2, 3, 2, 2)
    x_hat = x.clone()
    x_hat[0, 0, 0, 0] = 1.0           # one of 12 values off by 1 -> MSE 1/12
    x_hat[1] = 0.5                    # every value off by 0.5 -> MSE 0.25
    assert per_image_mse(x, x_hat).tolist() == pytest.approx([1 / 12, 0.25])


def test_a_perfect_reconstruction_is_floored_not_infinite():
    assert psnr_of_mean_mse(0.0) == pytest.approx(10 * math.log10(1 / MSE_FLOOR))
    assert mean_psnr(torch.zeros(3)) == pytest.approx(100.0)


def test_mean_psnr_of_no_images_is_an_error():
    with pytest.raises(ValueError):
        mean_psnr(torch.zeros(0))


def test_usage_and_perplexity_by_hand():
    codes = torch.tensor([[0, 0], [1, 3]])              # K = 4: code 2 unused
    counts = code_counts(codes, 4)
    assert counts.tolist() == [2, 1, 0, 1]
    assert codebook_usage(counts) == 0.75
    # p = (1/2, 1/4, 0, 1/4): entropy = 1.5 ln 2 nats -> perplexity 2^1.5
    assert perplexity(counts) == pytest.approx(2 ** 1.5)
    assert perplexity(torch.ones(512, dtype=torch.int64)) == pytest.approx(512)   # even use: K
    assert perplexity(torch.tensor([0, 7, 0])) == pytest.approx(1.0)              # one code
