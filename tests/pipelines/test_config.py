from dataclasses import dataclass, field

import pytest

from pipelines.config import build, load_config, parse_overrides
from tokenizer import ConfigError, VQVAEConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Stage:
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    amp: bool = False
    name: str | None = None


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  code_dim: 32\n  quantizer:\n    codebook_size: 256\nsteps: 5\n")
    cfg = load_config(Stage, str(path), ["model.quantizer.codebook_size=1024", "optim.lr=3e-4",
                                         "amp=true", "optim.betas=0.5,0.9", "steps=7"])
    assert cfg.model.code_dim == 32
    assert cfg.model.quantizer.codebook_size == 1024
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.5, 0.9)
    assert cfg.amp is True and cfg.steps == 7 and cfg.name is None


@pytest.mark.parametrize("override,message", [
    ("model.codebook_size=8", "unknown config key model.codebook_size"),
    ("steps=ten", "steps = 'ten' must be an integer"),
    ("steps=1.5", "steps = 1.5 must be an integer"),
    ("steps=7.0", "steps = 7.0 must be an integer"),
    # the same words as VQVAEConfig.from_dict (a tokenizer's config.json) uses for the same value
    ("model.quantizer.codebook_size=512.0", r"^model.quantizer.codebook_size = 512.0 must be an integer$"),
    ("amp=maybe", "amp = 'maybe' must be true or false"),
    ("model.resolution=30", "model.resolution = 30 must be divisible"),
    ("novalue", "expected KEY=VALUE"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage, None, [override])


def test_missing_and_invalid_yaml_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Stage, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Stage, str(bad))


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_build_accepts_an_existing_dataclass():
    model = VQVAEConfig(code_dim=16)
    assert build(Stage, {"model": model}).model is model
