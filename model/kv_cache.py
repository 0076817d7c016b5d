"""A preallocated, bounded KV cache for a contiguous range of layers.

Each sequence owns a slot: a fixed region [kv_heads, max_context, head_dim] per layer.
A slot's length is the number of valid positions; truncating (rolling back rejected
drafts) only lowers the length, and the stale entries are overwritten by the next
append. Nothing is allocated per step.
"""

from __future__ import annotations

import torch

from mtpd.model.errors import InputError

# An int8 cache (the CPU kernels' only, cpu_kernels.c) holds a float32 scale per KV_GROUP
# values of a vector, and its keys KV_BLOCK to a block: its positions are padded to a
# multiple of KV_BLOCK.
KV_GROUP = 32
KV_BLOCK = 16


def scale_groups(head_dim: int) -> int:
    """The scales an int8 cache holds for one vector."""
    return -(-head_dim // KV_GROUP)


def positions_held(dtype: torch.dtype, max_context: int) -> int:
    """The positions a cache of `dtype` holds for `max_context`."""
    return -(-max_context // KV_BLOCK) * KV_BLOCK if dtype == torch.int8 else max_context


def vector_bytes(dtype: torch.dtype, head_dim: int) -> int:
    """What a cache of `dtype` holds for one key or value vector, its scales included."""
    scales = 4 * scale_groups(head_dim) if dtype == torch.int8 else 0
    return head_dim * dtype.itemsize + scales


class CacheFullError(InputError):
    """No free slot, or a sequence would exceed the cache's context bound."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        max_context: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch_slot: bool = False,
    ) -> None:
        # The scratch slot is never given to a sequence: a CUDA graph captured for more
        # sequences than a step holds points the missing ones there.
        self.scratch_slot = max_seqs if scratch_slot else None
        positions = positions_held(dtype, max_context)
        shape = (num_layers, max_seqs + scratch_slot, num_kv_heads, positions, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            scales = (*shape[:-1], scale_groups(head_dim))
            self.k_scale = torch.zeros(scales, dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(scales, dtype=torch.float32, device=device)
        self.max_seqs = max_seqs
        self.max_context = max_context
        self.lengths = [0] * max_seqs
        self._free = list(range(max_seqs - 1, -1, -1))
        self._slot_of: dict[str, int] = {}
        # Per-(layer, slot) views made once: indexing the 5-d tensor per layer per step
        # costs several dispatches each time.
        self._k_views = [list(layer.unbind(0)) for layer in self.k.unbind(0)]
        self._v_views = [list(layer.unbind(0)) for layer in self.v.unbind(0)]

    @property
    def nbytes(self) -> int:
        scales = () if self.k_scale is None else (self.k_scale, self.v_scale)
        return sum(t.nbytes for t in (self.k, self.v, *scales))

    def k_slot(self, layer: int, slot: int) -> torch.Tensor:
        """[kv_heads, max_context, head_dim] keys of one sequence in one layer."""
        return self._k_views[layer][slot]

    def v_slot(self, layer: int, slot: int) -> torch.Tensor:
        return self._v_views[layer][slot]

    def slot(self, seq_id: str) -> int:
        """The slot of `seq_id`, allocated on first use."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            if not self._free:
                raise CacheFullError(f"KV cache full: all {self.max_seqs} sequence slots in use")
            slot = self._free.pop()
            self._slot_of[seq_id] = slot
            self.lengths[slot] = 0
        return slot

    def sequences(self) -> list[str]:
        return list(self._slot_of)

    def slot_of(self, seq_id: str) -> int | None:
        return self._slot_of.get(seq_id)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def rename(self, old: str, new: str) -> None:
        """`new` takes over the slot of `old` (prefix caching)."""
        self._slot_of[new] = self._slot_of.pop(old)

    def release(self, seq_id: str) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    def keep_error(self, slot: int, keep: int) -> str | None:
        """Why the slot cannot be truncated to `keep` positions, or None if it can."""
        if keep > self.lengths[slot]:
            return f"keep {keep} beyond its {self.lengths[slot]} cached positions"
        return None

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(
                f"cannot keep {length} positions of a sequence of {self.lengths[slot]}"
            )
        self.lengths[slot] = length

    def save_state(self, slot: int) -> None:
        """Nothing to save: an attention cache is cut at any position (a hybrid shard's
        recurrent states are not, `HybridCache.save_state`)."""

    def commit(self, slots: list[int], starts: list[int], counts: list[int]) -> None:
        """Record positions appended by a step, once every layer has written them."""
        for slot, start, count in zip(slots, starts, counts, strict=True):
            self.lengths[slot] = start + count

    def reserve(self, slot: int, n_new: int) -> int:
        """Check room for `n_new` positions; returns the start position of the new ones."""
        start = self.lengths[slot]
        if start + n_new > self.max_context:
            raise CacheFullError(
                f"sequence would reach {start + n_new} positions, beyond the cache's "
                f"max context of {self.max_context}"
            )
        return start
