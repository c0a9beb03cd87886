"""`vqtok train`: DDP training of the VQ-VAE from WebDataset shards."""
from .config import DataConfig, LoopConfig, OptimConfig, TrainConfig, resolve_config
from .launch import TrainArgs, launch, run_rank

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LoopConfig", "resolve_config", "TrainArgs",
           "launch", "run_rank"]
