"""The quantiser's view of data parallelism: one injected object with a sum and a broadcast.

The model never imports torch.distributed: the training stage passes an implementation
(`pipelines.distributed.quantizer_collectives()`), and this single-process default does nothing.
"""
from __future__ import annotations


class Collectives:
    """Collectives over the data-parallel replicas of a model; this base is one process alone.

    An implementation overrides `sum_` and `broadcast_` (both in place, called by every replica
    in the same order with tensors of the same shape) and sets `rank` and `world_size`.
    """

    rank: int = 0
    world_size: int = 1

    def sum_(self, tensor) -> None:
        """Replace `tensor` by its sum over all replicas."""

    def broadcast_(self, tensor, src: int = 0) -> None:
        """Replace `tensor` by replica `src`'s `tensor`."""
