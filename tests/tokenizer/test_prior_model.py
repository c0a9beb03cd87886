"""tokenizer.prior: the causal transformer over raster-order codes, its directory format."""
import math

import pytest
import torch

from tokenizer import VQVAE, CheckpointError, ConfigError, Prior, PriorConfig, VQVAEConfig


def tiny(num_classes=3, k=16, grid=(3, 3), seed=0) -> Prior:
    torch.manual_seed(seed)
    return Prior(PriorConfig(k, grid, num_classes, d_model=16, layers=2, heads=2, dropout=0.0)).eval()


def test_nll_is_the_step_by_step_prediction_and_depends_only_on_earlier_codes():
    prior = tiny()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 3, 3), generator=g)
    cls = torch.tensor([0, 1, 2, 1])
    nll = prior.nll(codes, cls)                                           # (4, 9) nats
    seq = codes.reshape(4, 9)
    for t in range(9):                          # predict code t from codes 0..t-1 alone
        logits = prior(seq[:, :t], cls)[:, -1]
        expected = -torch.log_softmax(logits.double(), -1).gather(1, seq[:, t:t + 1])[:, 0]
        assert torch.allclose(nll[:, t].double(), expected, atol=1e-5), t
    assert prior.loss(codes, cls).item() == pytest.approx(nll.mean().item(), rel=1e-5)
    changed = seq.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 16
    before, after = prior(seq[:, :-1], cls), prior(changed[:, :-1], cls)   # (4, 9, K) logits
    assert torch.allclose(after[:, :6], before[:, :6], atol=1e-6)          # positions <= 5: no look-ahead
    assert not torch.allclose(after[:, 6:], before[:, 6:])                 # later ones see code 5
    assert not torch.allclose(prior.nll(codes, torch.tensor([2, 2, 0, 0])), nll)   # the class matters


def test_sampling_is_seeded_and_follows_the_distribution():
    prior = tiny(num_classes=0)
    for p in prior.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        prior.head.bias[7] = 20.0               # every position: code 7, almost surely
    a = prior.sample(5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 3, 3) and bool((a == 7).all())
    with torch.no_grad():
        prior.head.bias.zero_()                 # uniform: seeded draws repeat, other seeds differ
    first = prior.sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, prior.sample(5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, prior.sample(5, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(1, temperature=0)


def test_a_conditional_prior_checks_its_class_ids():
    prior = tiny(num_classes=3)
    codes = torch.zeros(2, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="needs class ids"):
        prior.nll(codes)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        prior.nll(codes, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        prior.nll(codes + 16, torch.tensor([0, 1]))


def test_directory_round_trip_and_a_tokenizer_directory_is_refused(tmp_path):
    prior = tiny()
    sha = prior.save_pretrained(str(tmp_path / "p"), {"tokenizer_sha256": "ab" * 32})
    loaded, meta = Prior.from_pretrained(str(tmp_path / "p"))
    assert loaded.weights_sha256() == sha and meta == {"tokenizer_sha256": "ab" * 32}
    assert loaded.config == prior.config and not loaded.training
    VQVAE(VQVAEConfig(resolution=8, hidden=8, res_hidden=4, num_res_blocks=0, num_downsamples=1,
                      code_dim=4)).save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(CheckpointError, match="not a vqtok prior directory"):
        Prior.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(CheckpointError, match="no 'model' section"):
        VQVAE.from_pretrained(str(tmp_path / "p"))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.d_model = 10 must be divisible by model.heads = 4"):
        PriorConfig(16, (2, 2), d_model=10, heads=4)
    with pytest.raises(ConfigError, match="model.dropout"):
        PriorConfig(16, (2, 2), dropout=1.0)
    assert PriorConfig(16, [2, 3]).num_codes == 6 and math.isclose(PriorConfig(16, (1, 1)).dropout, 0.1)
