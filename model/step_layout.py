"""Where a step's rows sit: flat, every sequence's new tokens stacked (`BatchLayout`, with
their cache positions and rotary tables), or padded to the same rows per sequence and
held in tensors only, as a CUDA graph needs (`PaddedLayout`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from mtpd.model import cpu_kernels
from mtpd.model.kv_cache import KVCache


@dataclass
class BatchLayout:
    """Where each sequence's new tokens sit in a flat step batch, and in the cache."""

    slots: list[int]
    starts: list[int]  # cache position of each sequence's first new token
    counts: list[int]  # new tokens per sequence
    cos_table: torch.Tensor  # [positions, head_dim] rotary tables from position 0
    sin_signed_table: torch.Tensor  # sin with its first half negated (see layers._apply_rope)
    dtype: torch.dtype
    _kernel_step: tuple[KVCache, cpu_kernels.Step] | None = field(default=None, repr=False)

    def kernel_step(self, cache: KVCache) -> cpu_kernels.Step:
        """The layout in `cache` as cpu_kernels' decoder layers take it, made once."""
        if self._kernel_step is None or self._kernel_step[0] is not cache:
            step = cpu_kernels.Step.of(
                self.slots,
                self.starts,
                self.counts,
                self.cos_table,
                self.sin_signed_table,
                cache.k,
                cache.v,
                cache.k_scale,
                cache.v_scale,
            )
            self._kernel_step = (cache, step)
        return self._kernel_step[1]

    @functools.cached_property
    def cos(self) -> torch.Tensor:
        """[N, 1, head_dim]: the rotary table at the tokens' positions (the kernels' step
        reads the tables whole, and never gathers these)."""
        return self._at_positions(self.cos_table)

    @functools.cached_property
    def sin_signed(self) -> torch.Tensor:
        return self._at_positions(self.sin_signed_table)

    def _at_positions(self, table: torch.Tensor) -> torch.Tensor:
        positions = torch.cat(
            [torch.arange(s, s + c) for s, c in zip(self.starts, self.counts, strict=True)]
        ).to(table.device)
        return table[positions][:, None].to(self.dtype)

    @classmethod
    def build(
        cls,
        cache: KVCache,
        slots: list[int],
        counts: list[int],
        cos_table: torch.Tensor,
        sin_signed_table: torch.Tensor,
        dtype: torch.dtype,
    ) -> BatchLayout:
        starts = [cache.reserve(s, c) for s, c in zip(slots, counts, strict=True)]
        return cls(slots, starts, counts, cos_table, sin_signed_table, dtype)


@dataclass
class PaddedLayout:
    """A step as B sequences × T rows each, held in tensors only: one attention call
    serves every sequence and nothing in the layers touches Python lists, so the step
    can be captured in a CUDA graph. A sequence with fewer than T new tokens is padded;
    its padding rows take the positions after its real ones, where the cache tolerates
    stale entries (its length excludes them) and no real row's mask reaches them."""

    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, T]: each row's cache position
    context: int  # keys read per sequence: more than any row's position
    cos: torch.Tensor  # [B * T, 1, head_dim]
    sin_signed: torch.Tensor
    mask: torch.Tensor  # [B, 1, T, context]: row (b, t) sees keys up to its position

    @classmethod
    def build(
        cls,
        slots: torch.Tensor,
        starts: torch.Tensor,
        rows_per_seq: int,
        context: int,
        cos_table: torch.Tensor,
        sin_signed_table: torch.Tensor,
        dtype: torch.dtype,
    ) -> PaddedLayout:
        device = starts.device
        positions = starts[:, None] + torch.arange(rows_per_seq, device=device)[None, :]
        flat = positions.reshape(-1)
        mask = torch.arange(context, device=device)[None, None, :] <= positions[:, :, None]
        return cls(
            slots,
            positions,
            context,
            cos_table[flat][:, None].to(dtype),
            sin_signed_table[flat][:, None].to(dtype),
            mask[:, None],
        )


def padded_rows(counts: list[int], rows: int, device: torch.device) -> torch.Tensor:
    """Where each sequence's real rows sit in a step padded to `rows` rows per sequence."""
    return torch.tensor(
        [i * rows + j for i, c in enumerate(counts) for j in range(c)], device=device
    )
