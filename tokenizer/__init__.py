"""vqtok's models: a VQ-VAE image tokenizer (encoder, vector quantiser, decoder, checkpoints) and
the autoregressive prior over its codes (prior.py).

Pure model code: nothing here imports ray, torch.distributed or pipelines. The torch-backed names
are imported on first use, so that `from tokenizer import ConfigError` (CLIs, the tokenize
driver) costs no torch import.
"""
from .collectives import Collectives
from .config import ConfigError, QuantizerConfig, VQVAEConfig
from .storage import CheckpointError

__version__ = "0.1.0"
__all__ = ["VQVAE", "VectorQuantizer", "FiniteScalarQuantizer", "VQVAEConfig", "QuantizerConfig", "ConfigError",
           "CheckpointError", "Collectives", "nearest_codes", "Prior", "PriorConfig", "__version__"]

_LAZY = {"VQVAE": ".model", "VectorQuantizer": ".quantizer", "FiniteScalarQuantizer": ".fsq", "nearest_codes": ".nearest",
         "Prior": ".prior", "PriorConfig": ".prior"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
