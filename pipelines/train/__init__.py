"""`vqtok train`: DDP training of the VQ-VAE from WebDataset shards."""
from .config import DataConfig, LoopConfig, OptimConfig, TrainConfig, resolve_config, run_config_url
from .launch import TrainArgs, launch, run_rank

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LoopConfig", "resolve_config", "run_config_url",
           "TrainArgs",
           "launch", "run_rank"]
