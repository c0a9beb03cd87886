"""Data parallelism applied from outside the model: wrap a VQVAE in DDP."""
from __future__ import annotations

import inspect
import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import DistInfo

# conv weights with one input channel get grads whose strides differ from DDP's bucket view;
# harmless (a copy), and not something a user can act on
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def parallelize(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP averages gradients. Parameters and buffers are synced once at construction; buffers
    are not re-broadcast every forward: the codebook's EMA buffers are kept equal by the
    quantiser's own collectives (summed statistics, rank 0's seeds), and a per-step broadcast
    would cost bandwidth and hide a replica drift instead of exposing it."""
    model = model.to(info.device)
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
