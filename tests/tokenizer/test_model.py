import json
import os
import pickle

import pytest
import torch

from tokenizer import VQVAE, CheckpointError, ConfigError, QuantizerConfig, VQVAEConfig


def tiny(**kw) -> VQVAEConfig:
    base = dict(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=1, code_dim=8,
                quantizer=QuantizerConfig(codebook_size=32, kmeans_iters=2))
    base.update(kw)
    return VQVAEConfig(**base)


@pytest.mark.parametrize("channels,resolution,downs,grid", [(1, 28, 2, 7), (3, 32, 2, 8), (3, 128, 2, 32), (3, 32, 3, 4)])
def test_grid_follows_the_number_of_downsamplings(channels, resolution, downs, grid):
    model = VQVAE(tiny(in_channels=channels, resolution=resolution, num_downsamples=downs)).eval()
    x = torch.rand(2, channels, resolution, resolution)
    codes = model.encode(x)
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.int64
    assert model.grid == (grid, grid)
    x_hat = model.decode(codes)
    assert x_hat.shape == x.shape and x_hat.min() >= 0 and x_hat.max() <= 1


def test_training_forward_returns_named_losses_that_train_the_whole_model():
    torch.manual_seed(0)
    model = VQVAE(tiny()).train()
    x = torch.rand(4, 1, 28, 28)
    x_hat, codes, losses = model(x)
    assert {"reconstruction", "commitment"} <= set(losses)
    sum(losses.values()).backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0     # straight-through reaches the encoder
    assert model.decoder.net[0].weight.grad.abs().sum() > 0


def test_encode_rejects_wrong_input_shape_with_a_clear_message():
    model = VQVAE(tiny())
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model.encode(torch.rand(2, 3, 28, 28))


def test_decode_rejects_out_of_range_codes():
    model = VQVAE(tiny())
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 7, 7), 32))


def test_save_load_round_trip_gives_bit_identical_codes(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(tiny()).train()
    model(torch.rand(8, 1, 28, 28))              # k-means init + EMA move the buffers
    model.eval()
    x = torch.rand(16, 1, 28, 28)
    sha = model.save_pretrained(str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["config.json", "model.safetensors"]
    loaded = VQVAE.from_pretrained(str(tmp_path / "tok"))
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    assert loaded.weights_sha256() == sha == model.weights_sha256()
    assert loaded.config == model.config


def test_round_trip_through_an_fsspec_url():
    model = VQVAE(tiny()).eval()
    model.save_pretrained("memory://vqtok-test/tok")
    loaded = VQVAE.from_pretrained("memory://vqtok-test/tok")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_sha256_is_stable_and_tracks_the_weights():
    torch.manual_seed(0)
    a = VQVAE(tiny())
    b = VQVAE(tiny())
    b.load_state_dict(a.state_dict())
    assert a.weights_sha256() == b.weights_sha256()
    with torch.no_grad():
        b.quantizer.codebook[0, 0] += 1e-3
    assert a.weights_sha256() != b.weights_sha256()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_refused_and_never_executed(tmp_path):
    VQVAE(tiny()).save_pretrained(str(tmp_path))
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    payload = pickle.dumps({"encoder.net.0.weight": exploit})
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VQVAE.from_pretrained(str(tmp_path))
    torch.save({"x": exploit}, tmp_path / "evil.pt")           # torch's zip+pickle format
    from tokenizer.checkpoint import load_weights
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_weights(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_mismatched_weights_are_named(tmp_path):
    VQVAE(tiny()).save_pretrained(str(tmp_path / "small"))
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    config["model"]["quantizer"]["codebook_size"] = 64
    (tmp_path / "small" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*quantizer.codebook.*\(32, 8\).*\(64, 8\)"):
        VQVAE.from_pretrained(str(tmp_path / "small"))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        VQVAE.from_pretrained(str(tmp_path / "nothing"))
    VQVAE(tiny()).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        VQVAE.from_pretrained(str(tmp_path))


def test_tampered_weights_fail_the_sha_check(tmp_path):
    model = VQVAE(tiny())
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        model.quantizer.codebook.mul_(2)
    from tokenizer.checkpoint import save_weights_bytes
    (tmp_path / "model.safetensors").write_bytes(save_weights_bytes(model.state_dict()))
    with pytest.raises(CheckpointError, match="sha256"):
        VQVAE.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=2), "model.in_channels = 2 must be 1 .grey. or 3 .RGB."),
    (dict(resolution=30), "model.resolution = 30 must be divisible by 2\\*\\*num_downsamples = 4"),
    (dict(code_dim=0), "model.code_dim = 0 must be >= 1"),
    (dict(outer_hidden=0), "model.outer_hidden = 0 must be >= 1 or null"),
    (dict(decoder_res_blocks=-1), "model.decoder_res_blocks = -1 must be >= 0 or null"),
    (dict(quantizer={"codebook_size": 1}), "quantizer.codebook_size = 1 must be >= 2"),
    (dict(quantizer={"decay": 1.5}), "quantizer.decay = 1.5 must be in"),
    (dict(quantizer={"codebok_size": 8}), "unknown key model.quantizer.codebok_size"),
])
def test_config_validation_messages_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VQVAEConfig(**kwargs)


@pytest.mark.parametrize("data,message", [
    ({"quantizer": {"codebook_size": 512.0}}, r"^model.quantizer.codebook_size = 512.0 must be an integer$"),
    ({"quantizer": {"codebook_size": 1e9}}, r"^model.quantizer.codebook_size = 1000000000.0 must be an integer$"),
    ({"quantizer": {"codebook_size": True}}, r"^model.quantizer.codebook_size = True must be an integer$"),
    ({"quantizer": {"codebook_size": "512"}}, r"^model.quantizer.codebook_size = '512' must be an integer$"),
    ({"quantizer": {"codebook_dim": 8.0}}, r"^model.quantizer.codebook_dim = 8.0 must be an integer or null$"),
    ({"quantizer": {"kmeans_iters": 2.5}}, r"^model.quantizer.kmeans_iters = 2.5 must be an integer$"),
    ({"quantizer": {"chunk_size": False}}, r"^model.quantizer.chunk_size = False must be an integer$"),
    ({"hidden": 16.0}, r"^model.hidden = 16.0 must be an integer$"),
    ({"code_dim": "8"}, r"^model.code_dim = '8' must be an integer$"),
    ({"num_res_blocks": None}, r"^model.num_res_blocks = None must be an integer$"),
    ({"quantizer": {"beta": "0.25"}}, r"^model.quantizer.beta = '0.25' must be a number$"),
    ({"quantizer": {"decay": float("nan")}}, r"^model.quantizer.decay = nan must be a finite number$"),
    ({"quantizer": {"ema": 1}}, r"^model.quantizer.ema = 1 must be true or false$"),
    ({"quantizer": {"gradient": None}}, r"^model.quantizer.gradient = None must be a string$"),
    ({"quantizer": 512}, r"^model.quantizer must be a mapping, got int$"),
])
def test_from_dict_refuses_values_of_the_wrong_type_by_their_dotted_key(data, message):
    with pytest.raises(ConfigError, match=message):
        VQVAEConfig.from_dict(data)


def test_float_fields_take_integers_and_numpy_scalars_become_python_numbers():
    import numpy as np
    config = VQVAEConfig.from_dict({"code_dim": np.int64(16), "quantizer": {"beta": 0, "dead_code_threshold": 2}})
    assert config.quantizer.beta == 0.0 and type(config.quantizer.beta) is float
    assert type(config.quantizer.dead_code_threshold) is float and type(config.code_dim) is int
    json.dumps(config.to_dict())     # what save_pretrained writes


def test_a_codebook_too_big_for_memory_is_refused_before_allocating_it(monkeypatch):
    import tokenizer.config as tc
    monkeypatch.setattr(tc, "physical_memory_bytes", lambda: 1 << 30)
    # 2**21 codes x 64 fp32 = 512 MiB, twice with EMA: 1 GiB and 8 MiB of counts
    with pytest.raises(ConfigError, match=r"^model.quantizer.codebook_size = 2097152 with dimension 64 needs "
                                          r"1.0 GiB .*EMA.*more than this machine's 1.0 GiB of memory$"):
        VQVAEConfig.from_dict({"quantizer": {"codebook_size": 2**21}})
    VQVAEConfig.from_dict({"quantizer": {"codebook_size": 2**21, "ema": False}})    # 512 MiB fits
    with pytest.raises(ConfigError, match="with dimension 256 needs"):   # codebook_dim counts, not code_dim
        VQVAEConfig.from_dict({"quantizer": {"codebook_size": 2**20, "codebook_dim": 256}})
    from tokenizer import VectorQuantizer
    with pytest.raises(ConfigError, match="needs"):                            # built directly too
        VectorQuantizer(QuantizerConfig(codebook_size=2**21), dim=64)
    monkeypatch.setattr(tc, "physical_memory_bytes", lambda: None)           # unknown: a fixed cap
    with pytest.raises(ConfigError, match="more than the 1024.0 GiB limit"):
        VQVAEConfig.from_dict({"quantizer": {"codebook_size": 2**31 - 1}, "code_dim": 256})


@pytest.mark.parametrize("quantizer,message", [
    ({"codebook_size": 512.0}, "model.quantizer.codebook_size = 512.0 must be an integer"),
    ({"codebook_size": 2**21}, "model.quantizer.codebook_size = 2097152 with dimension 8 needs"),
])
def test_from_pretrained_names_config_json_and_the_key(tmp_path, monkeypatch, quantizer, message):
    import tokenizer.config as tc
    monkeypatch.setattr(tc, "physical_memory_bytes", lambda: 64 << 20)
    VQVAE(tiny()).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["quantizer"].update(quantizer)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        VQVAE.from_pretrained(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / "config.json")) and message in str(e.value)


def test_outer_hidden_sets_the_width_of_the_finer_resolutions():
    paper = VQVAE(VQVAEConfig(hidden=64))
    wide = VQVAE(VQVAEConfig(hidden=64, outer_hidden=48))
    assert paper.encoder.net[0].out_channels == 32 and wide.encoder.net[0].out_channels == 48
    assert wide.decoder.net[-1].in_channels == 48
    assert wide(torch.rand(2, 1, 28, 28))[0].shape == (2, 1, 28, 28)


def test_decoder_res_blocks_deepens_only_the_decoder_and_old_configs_keep_their_shape(tmp_path):
    def blocks(module):
        return sum(type(m).__name__ == "ResidualBlock" for m in module.modules())
    same, deeper = VQVAE(tiny(num_res_blocks=2)), VQVAE(tiny(num_res_blocks=2, decoder_res_blocks=4))
    assert (blocks(same.encoder), blocks(same.decoder)) == (2, 2)
    assert (blocks(deeper.encoder), blocks(deeper.decoder)) == (2, 4)
    assert deeper(torch.rand(2, 1, 28, 28))[0].shape == (2, 1, 28, 28)
    # a tokenizer saved before the key existed has no decoder_res_blocks: as many as the encoder
    same.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["decoder_res_blocks"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VQVAE.from_pretrained(str(tmp_path))
    assert blocks(loaded.decoder) == 2
