"""Weights as untrusted input: safetensors (or torch's weights_only loader), clear errors."""
from __future__ import annotations

import hashlib
import io
import json

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .storage import (CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError,  # noqa: F401
                      is_local_fs, join_url, read_bytes, write_bytes_atomic)


def load_weights(url: str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or from a torch file with weights_only=True."""
    data = read_bytes(url)
    if url.endswith(".safetensors"):
        try:
            return load_safetensors_bytes(data)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{url}: not a valid safetensors file ({e})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{url}: refused to load; only plain tensors are accepted "
                              f"(weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{url}: expected a dict of tensors, found {type(state).__name__}")
    return state


def save_weights_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return save_safetensors_bytes(tensors, metadata=metadata)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Stable identity of a set of weights: sha256 over sorted (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        # reshape(-1): unit stride even for layouts that count as contiguous with odd strides
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_state_dict(url: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{url}: missing tensor {missing[0]!r} ({len(missing)} missing); "
                              "the weights do not match config.json")
    if unexpected:
        raise CheckpointError(f"{url}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} extra); "
                              "the weights do not match config.json")
    for name, ref in expected.items():
        got = found[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{url}: tensor {name!r} has shape {tuple(got.shape)}, "
                                  f"config.json implies {tuple(ref.shape)}")
