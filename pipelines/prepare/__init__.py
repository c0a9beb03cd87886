"""`vqtok prepare`: raw datasets to WebDataset shards (written atomically)."""
from .fashion import DEFAULT_SOURCE, prepare_fashion_mnist
from .folder import FolderOptions, prepare_folder
from .idx import read_idx
from ..shards.writer import ShardWriter

__all__ = ["prepare_fashion_mnist", "prepare_folder", "FolderOptions", "read_idx", "ShardWriter",
           "DEFAULT_SOURCE"]
