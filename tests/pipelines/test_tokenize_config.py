"""TokenizeConfig (pipelines/tokenize/config.py)."""

from __future__ import annotations

import pytest
from pipelines.tokenize import TokenizeConfig
from tokenizer import ConfigError


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="tokenize.batch_size"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", batch_size=0)
    with pytest.raises(ConfigError, match="tokenize.keep_fields"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", keep_fields="codes")
    with pytest.raises(ConfigError, match="tokenize.max_error_rate"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", max_error_rate=2)
    assert TokenizeConfig(tokenizer="t", inputs="a.tar", output="o", keep_fields="cls, json").keep_fields == ["cls", "json"]


def test_lease_times_are_validated():
    with pytest.raises(ConfigError, match="tokenize.lease_heartbeat = 0 must be > 0"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", lease_heartbeat=0)
    with pytest.raises(ConfigError,
                       match=r"tokenize.lease_stale = 20 must be at least 3 x tokenize.lease_heartbeat \(10 s\)"):
        TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o", lease_stale=20)
    cfg = TokenizeConfig(tokenizer="t", inputs=["a.tar"], output="o")
    assert (cfg.lease_heartbeat, cfg.lease_stale) == (10.0, 60.0)
