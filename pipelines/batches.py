"""batched: items in lists of a fixed size (the last one shorter), as `vqtok decode` feeds code
rows and `vqtok eval` feeds images to the model (itertools.batched needs Python 3.12)."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int, limit: int | None = None) -> Iterator[list[T]]:
    """Lists of `size` consecutive items, of at most the first `limit` items (None: all)."""
    if size < 1:
        raise ValueError(f"batch size {size} must be >= 1")
    rest = iter(items) if limit is None else islice(items, limit)
    while batch := list(islice(rest, size)):
        yield batch
