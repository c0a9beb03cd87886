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
