"""vqtok pipelines: data preparation, DDP training, Ray tokenization, readers."""
from tokenizer import __version__

__all__ = ["__version__", "CodesDataset"]


def __getattr__(name):  # lazy: importing pipelines must not pull in torch.distributed or ray
    if name == "CodesDataset":
        from .readers import CodesDataset
        return CodesDataset
    raise AttributeError(name)
