"""What a worker's memory holds (weights, the MTP head, caches) and its peak, for
GetStats and `mtpd bench`."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


def _tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    # Keyed by storage, so a tied or shared weight counts once even where two Parameter
    # objects wrap it; packed (oneDNN) weights have no storage to share: by identity.
    return {_storage_key(t): t for t in [*module.parameters(), *module.buffers()] if t is not None}


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return id(t)


def tensor_bytes(module: nn.Module, shared_with: nn.Module | None = None) -> int:
    """Bytes of `module`'s weights and buffers, less those it shares with `shared_with`."""
    own = _tensors(module)
    if shared_with is not None:
        for key in _tensors(shared_with):
            own.pop(key, None)
    return sum(t.numel() * t.element_size() for t in own.values())


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB
