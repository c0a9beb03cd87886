"""vqtok's model: a VQ-VAE image tokenizer (encoder, vector quantiser, decoder, checkpoints).

Pure model code: nothing here imports ray, torch.distributed or pipelines.
"""
from .checkpoint import CheckpointError
from .config import ConfigError, QuantizerConfig, VQVAEConfig
from .model import VQVAE
from .nearest import nearest_codes
from .quantizer import VectorQuantizer

__version__ = "0.1.0"
__all__ = ["VQVAE", "VectorQuantizer", "VQVAEConfig", "QuantizerConfig", "ConfigError",
           "CheckpointError", "nearest_codes", "__version__"]
