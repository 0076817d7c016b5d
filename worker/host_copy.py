"""Device-to-host copies through reusable page-locked (pinned) buffers.

From pageable memory the driver stages every copy through its own pinned buffer, at
about half the speed; copying into a buffer pinned once avoids that on every step (the
tail's logits for verification, activations relayed as bytes). On CPU nothing is copied.
"""

from __future__ import annotations

import torch


class PinnedStaging:
    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements  # beyond it a copy goes through pageable memory
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the host. From a GPU the result is a view of the buffer: it stays valid
        until the next copy of the same dtype, so callers copy out what they keep."""
        if t.device.type != "cuda":
            return t
        n = t.numel()
        if n > self.max_elements:
            return t.cpu()
        buf = self._buffers.get(t.dtype)
        if buf is None or buf.numel() < n:
            # Grown to the step's size (pinning is slow, so never shrunk), bounded above.
            size = min(self.max_elements, max(n, 2 * (0 if buf is None else buf.numel())))
            buf = self._buffers[t.dtype] = torch.empty(size, dtype=t.dtype, pin_memory=True)
        out = buf[:n].view(t.shape)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out
