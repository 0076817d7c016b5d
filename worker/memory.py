"""What a worker's memory holds (weights, the MTP head, caches) and its peak, for
GetStats and `mtpd bench`."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


def _tensors(module: nn.Module) -> dict[int, torch.Tensor]:
    # By identity: packed (oneDNN) weights have no storage pointer to compare, and a
    # tied or shared weight is the same tensor object wherever it is used.
    return {id(t): t for t in [*module.parameters(), *module.buffers()] if t is not None}


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
