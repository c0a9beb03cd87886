"""`vqtok tokenize`: stream WebDataset shards through a trained tokenizer on Ray and write the
codes as Parquet, one file per shard, exactly once (see docs/tokenize.md)."""
from .config import TokenizeConfig

__all__ = ["TokenizeConfig", "run_tokenize"]


def __getattr__(name):  # lazy: the driver imports ray
    if name == "run_tokenize":
        from .driver import run_tokenize
        return run_tokenize
    raise AttributeError(name)
