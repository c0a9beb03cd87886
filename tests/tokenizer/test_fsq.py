import math

import pytest
import torch

from tokenizer import Collectives, ConfigError, FiniteScalarQuantizer, QuantizerConfig, VQVAE, VQVAEConfig

LEVELS = [8, 8, 6, 5, 5]


def fsq(levels=LEVELS, dim=16, collectives=None):
    return FiniteScalarQuantizer(QuantizerConfig(kind="fsq", levels=levels), dim, collectives)


def identity_projection(q: FiniteScalarQuantizer) -> None:
    """in_proj passes the first len(levels) input channels through unchanged."""
    with torch.no_grad():
        q.in_proj.weight.zero_()
        q.in_proj.weight[:, :len(q.levels_list)] = torch.eye(len(q.levels_list))
        q.in_proj.bias.zero_()


def test_levels_set_the_codebook_size_and_every_index_round_trips_through_its_digits():
    q = fsq()
    assert q.codebook_size == math.prod(LEVELS) == 9600
    idx = torch.arange(q.codebook_size)
    digits = q.index_to_digits(idx)
    assert digits.shape == (9600, 5)
    assert bool(((digits >= 0) & (digits < torch.tensor(LEVELS))).all())
    assert torch.equal(q.digits_to_index(digits), idx)
    assert len({tuple(d) for d in digits.tolist()}) == 9600


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5], [2, 3]])
def test_each_channel_takes_exactly_its_number_of_levels(levels):
    q = fsq(levels, dim=len(levels))
    identity_projection(q)
    sweep = torch.linspace(-30, 30, 4001)[:, None].expand(-1, len(levels))
    digits = q.index_to_digits(q.nearest(sweep))
    for c, level in enumerate(levels):
        assert sorted(set(digits[:, c].tolist())) == list(range(level))


def test_codes_lie_in_range_and_lookup_returns_the_quantised_value_of_forward():
    torch.manual_seed(0)
    q = fsq().eval()
    z = torch.randn(4, 6, 6, 16) * 3
    z_q, idx, losses = q(z)
    assert losses == {} and idx.shape == (4, 6, 6) and z_q.shape == z.shape
    assert int(idx.min()) >= 0 and int(idx.max()) < 9600
    assert torch.allclose(q.lookup(idx), z_q, atol=1e-6)
    assert torch.equal(q.nearest(z), idx)        # float64 projection agrees away from ties


def test_a_vectors_code_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    q = fsq().eval()
    z = torch.randn(3000, 16) * 2
    whole = q.nearest(z)
    alone = torch.cat([q.nearest(z[i:i + 1]) for i in range(0, 3000, 97)])
    assert torch.equal(alone, whole[::97])
    assert torch.equal(q.nearest(z.flip(0)), whole.flip(0))


def test_a_value_half_way_between_two_levels_rounds_to_the_even_one():
    q = fsq([5], dim=1)          # levels -2..2, digits 0..4
    identity_projection(q)
    q.bound = lambda h: h        # look at the rounding alone
    half_way = torch.tensor([[-1.5], [-0.5], [0.5], [1.5]], dtype=torch.float64)
    # -1.5 -> -2, -0.5 -> -0, 0.5 -> 0, 1.5 -> 2 (half to even); digits = value + 2
    assert q.nearest(half_way).tolist() == [0, 2, 2, 4]


def test_rounding_passes_the_gradient_straight_through_to_the_encoder():
    torch.manual_seed(0)
    q = fsq().train()
    z = torch.randn(32, 16, requires_grad=True)
    z_q, _, _ = q(z)
    z_q.sum().backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0
    assert q.in_proj.weight.grad is not None and torch.count_nonzero(q.in_proj.weight.grad) > 0


def test_training_usage_is_counted_over_the_replicas():
    class OtherReplicaUsedTheLastCode(Collectives):
        calls = 0

        def sum_(self, t):
            OtherReplicaUsedTheLastCode.calls += 1
            t[-1] += 1
    q = fsq(collectives=OtherReplicaUsedTheLastCode()).train()
    _, idx, _ = q(torch.randn(64, 16))
    used = set(idx.tolist()) | {9599}
    assert OtherReplicaUsedTheLastCode.calls == 1
    assert float(q.metrics["usage"]) == pytest.approx(len(used) / 9600)
    q.eval()(torch.randn(64, 16))     # eval never calls a collective (one rank may run it alone)
    assert OtherReplicaUsedTheLastCode.calls == 1


@pytest.mark.parametrize("quantizer, message", [
    ({"kind": "lfq"}, "model.quantizer.kind = 'lfq' must be vq or fsq"),
    ({"kind": "fsq"}, "model.quantizer.levels = None must be a list of integers >= 2 for kind: fsq"),
    ({"kind": "fsq", "levels": [8, 1, 5]}, "must hold integers >= 2 only"),
    ({"kind": "fsq", "levels": [8, 8.5]}, "must hold integers >= 2 only"),
    ({"kind": "fsq", "levels": [8, 8, 6, 5, 5], "codebook_size": 8192},
     "codebook_size = 8192 contradicts levels [8, 8, 6, 5, 5] (prod = 9600)"),
    ({"levels": [8, 8]}, "model.quantizer.levels = [8, 8] is for kind: fsq"),
    ({"kind": "fsq", "levels": [1 << 16, 1 << 16]}, "more than 2**31 - 1"),
])
def test_fsq_config_errors_name_the_key(quantizer, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace("*", r"\*")):
        VQVAEConfig.from_dict({"quantizer": quantizer})


def test_a_vqvae_with_fsq_encodes_decodes_and_round_trips_through_its_directory(tmp_path):
    torch.manual_seed(0)
    config = VQVAEConfig(in_channels=3, resolution=16, hidden=16, res_hidden=8, code_dim=8,
                         quantizer={"kind": "fsq", "levels": [4, 3, 5]})
    model = VQVAE(config)
    assert model.codebook_size == 60 and config.quantizer.codebook_size == 60
    x = torch.rand(5, 3, 16, 16)
    _, _, losses = model.train()(x)
    assert set(losses) == {"reconstruction"}
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (5, 4, 4) and int(codes.max()) < 60
    assert torch.equal(model.encode(x[2:3]), codes[2:3])
    assert model.decode(codes).shape == (5, 3, 16, 16)
    model.save_pretrained(str(tmp_path / "tok"))
    loaded = VQVAE.from_pretrained(str(tmp_path / "tok"))
    assert loaded.config.quantizer.kind == "fsq" and loaded.config.quantizer.levels == [4, 3, 5]
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 60\)"):
        loaded.decode(torch.full((1, 4, 4), 60))



def test_the_decorrelation_loss_decorrelates_the_channels():
    from tokenizer.fsq import channel_correlation
    torch.manual_seed(0)
    q = FiniteScalarQuantizer(QuantizerConfig(kind="fsq", levels=LEVELS, decorrelation=1.0), 16).train()
    z = torch.randn(512, 1) * torch.ones(1, 16) + 0.3 * torch.randn(512, 16)      # one common factor
    with torch.no_grad():
        q.in_proj.weight.copy_(q.in_proj.weight.abs())          # every channel reads that factor
    with torch.no_grad():
        before = float(channel_correlation(q.bound(q.in_proj(z))))
    opt = torch.optim.Adam(q.in_proj.parameters(), 3e-2)
    for _ in range(60):
        _, _, losses = q(z)
        opt.zero_grad()
        losses["decorrelation"].backward()
        opt.step()
    with torch.no_grad():
        after = float(channel_correlation(q.bound(q.in_proj(z))))
    assert before > 0.5 and after < 0.1
    _, _, losses = q.eval()(z)
    assert losses == {}                                           # a training loss only


def test_decorrelation_is_for_fsq_only():
    with pytest.raises(ConfigError, match="model.quantizer.decorrelation = 0.1 is for kind: fsq"):
        QuantizerConfig(decorrelation=0.1)
