"""`vqtok prior`: train, evaluate and sample an autoregressive prior over a tokenize output's
codes (the model: tokenizer/prior.py)."""
from .config import PriorTrainConfig, resolve_prior_config
from .launch import PriorArgs, launch_prior

__all__ = ["PriorTrainConfig", "resolve_prior_config", "PriorArgs", "launch_prior"]
