"""Decode and verification steps replayed as CUDA graphs.

On a GPU, a step of a few tokens per sequence is bound by launching kernels, not by
reading weights: every layer is a dozen small kernels, each queued by Python. A step of
B sequences with at most T new tokens each runs instead as the padded layout
(`PaddedLayout`, model/layers.py) of the smallest bucket (B', T, L) that holds it —
B' ≥ B sequences (the missing ones point at the cache's scratch slot), T rows per
sequence, L keys read per sequence — whose graph, captured on first use from static
input buffers, replays the whole shard in one launch. Prefill chunks and steps beyond
the buckets run eagerly, as before.

With `capture=False` the same padded computation runs eagerly: that is how the CPU
tests check it against the per-sequence path the graphs replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpd.model.decoder import DecoderShard
from mtpd.model.errors import InputError
from mtpd.model.kv_cache import KVCache
from mtpd.model.layers import LayerStack
from mtpd.model.step_layout import PaddedLayout, padded_rows

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_ROWS_PER_SEQ = 8  # one token plus up to 7 drafts: decoding and verification
MIN_CONTEXT_BUCKET = 256


@dataclass
class _Bucket:
    inputs: torch.Tensor  # [B * T] token ids on the first stage, else [B * T, input_width]
    slots: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]: cache position of each sequence's first row
    output: torch.Tensor | None = None  # [B * T, output width]: written by every replay
    graph: torch.cuda.CUDAGraph | None = None


def _smallest_at_least(n: int, sizes: tuple[int, ...]) -> int | None:
    return next((s for s in sizes if s >= n), None)


def context_bucket(needed: int, max_context: int) -> int:
    """Keys read per sequence: the next power of two (from 256), capped at the cache."""
    size = MIN_CONTEXT_BUCKET
    while size < needed:
        size *= 2
    return min(size, max_context)


class StepGraphs:
    def __init__(self, shard: DecoderShard, cache: KVCache, capture: bool = True) -> None:
        if not self.supports(shard):
            raise ValueError("padded steps cover attention-only layer stacks")
        if cache.scratch_slot is None:
            raise ValueError("padded steps need a cache with a scratch slot")
        self.shard, self.cache, self.capture = shard, cache, capture
        self.buckets: dict[tuple[int, int, int], _Bucket] = {}
        # One memory pool for every graph: they never run at once, so their
        # intermediates can share memory (each replay's output is copied out at once).
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @staticmethod
    def supports(shard: DecoderShard) -> bool:
        # Hybrid stacks keep per-step state logs and MoE layers sync with the host.
        return type(shard.stack) is LayerStack

    @classmethod
    def wanted(cls, requested: bool | None, shard: DecoderShard, quant: str) -> bool:
        """Whether the shard's steps replay as graphs. Unset (None): wherever they apply
        and were measured on a GPU — a CUDA device, attention layers only, unquantized
        weights (packed int8/int4 kernels under capture are not yet measured)."""
        applies = shard.device.type == "cuda" and cls.supports(shard)
        if requested and not applies:
            raise InputError(
                f"CUDA graphs need a CUDA device and a model of attention layers only "
                f"(this worker: {shard.device}, {shard.cfg.architecture})"
            )
        return (applies and quant == "none") if requested is None else requested

    def run(self, x: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor | None:
        """The shard's output for this step ([sum(counts), hidden], like forward()), with
        the cache lengths advanced; None when no bucket holds the step (run it eagerly)."""
        cache, rows_per_seq = self.cache, max(counts)
        batch = _smallest_at_least(len(slots), BATCH_BUCKETS)
        starts = [cache.lengths[s] for s in slots]
        needed = max(starts) + rows_per_seq  # padding rows need room too
        if batch is None or rows_per_seq > MAX_ROWS_PER_SEQ or needed > cache.max_context:
            return None
        key = (batch, rows_per_seq, context_bucket(needed, cache.max_context))
        bucket = self.buckets.get(key) or self._new_bucket(*key)

        device, pad = self.shard.device, batch - len(slots)
        real_rows = padded_rows(counts, rows_per_seq, device)
        bucket.slots.copy_(torch.tensor(slots + [cache.scratch_slot] * pad))
        bucket.starts.copy_(torch.tensor(starts + [0] * pad))
        bucket.inputs.index_copy_(0, real_rows, x)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.output = self._forward(bucket, rows_per_seq, key[2])
        cache.commit(slots, starts, counts)
        # A copy: the next replay overwrites the graph's output (and this one may still
        # be in flight to the next stage).
        return bucket.output.index_select(0, real_rows)

    def _forward(self, bucket: _Bucket, rows_per_seq: int, context: int) -> torch.Tensor:
        stack = self.shard.stack
        layout = PaddedLayout.build(
            bucket.slots,
            bucket.starts,
            rows_per_seq,
            context,
            stack.cos,
            stack.sin_signed,
            stack.dtype,
        )
        return self.shard.forward_padded(bucket.inputs, self.cache, layout)

    def _new_bucket(self, batch: int, rows_per_seq: int, context: int) -> _Bucket:
        shard, device = self.shard, self.shard.device
        n = batch * rows_per_seq
        inputs = (
            torch.zeros(n, dtype=torch.long, device=device)
            if shard.spec.has_embedding
            else torch.zeros(n, shard.input_width, dtype=shard.dtype, device=device)
        )
        bucket = _Bucket(
            inputs,
            torch.full((batch,), self.cache.scratch_slot, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )
        if self.capture:
            # Warm up on a side stream (lazy initialisation must not be captured), then
            # capture. Both runs write only the scratch slot.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._forward(bucket, rows_per_seq, context)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket.output = self._forward(bucket, rows_per_seq, context)
            bucket.graph = graph
        self.buckets[(batch, rows_per_seq, context)] = bucket
        return bucket
