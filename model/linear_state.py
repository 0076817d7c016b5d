"""The caches of a hybrid (Qwen3.5) shard: a KV cache for its full-attention layers and,
for its Gated DeltaNet layers, each sequence's recurrent state and convolution window —
and how both roll back.

An attention cache rolls back by truncation. A recurrent state cannot: it is one
matrix per head that every position has written into. So each sequence slot keeps,
per linear-attention layer, two state buffers and two convolution windows: the step
reads the current one and writes the other, and the one it read stays as it was — the
state before the step. The step also logs the delta rule's inputs at each of its
positions (k, v, decay, beta, and the convolution's inputs). Rolling back to n of
the step's positions replays those n logged updates from the state before the step,
with the very code the forward pass ran, so the state is bit for bit the one the pass
had after position n - 1 (no per-position copies of the state: its memory is twice
the state, plus the small log). A step of more than ROLLBACK_POSITIONS positions (a
prefill chunk) runs in the chunked form and logs nothing: it can only be kept whole or
dropped whole.

For prefix caching a slot also keeps up to `snapshots` saved states, taken after prefill
chunks that end on a multiple of the delta rule's chunk (STATE_BLOCK): a later prompt
sharing a prefix restarts from the last one within it. The daemon lines every prompt's
chunks up with those blocks (`LoadReply.state_block`), so a restarted prompt computes
exactly what a fresh one would.

Every bound is set up front, per slot: nothing is allocated per step.
"""

from __future__ import annotations

import torch

from mtpd.model import delta_rule
from mtpd.model.config import LinearAttentionConfig
from mtpd.model.kv_cache import KVCache

# A verification step: the last accepted token and up to 16 drafts
# (mtpd.worker.stage.MAX_DRAFT_TOKENS).
ROLLBACK_POSITIONS = 17
# A recurrent state saved after STATE_BLOCK * n positions, all prefilled in the chunked
# form, is the state a fresh prefill reaches there, bit for bit.
STATE_BLOCK = delta_rule.CHUNK


class LinearStates:
    """Recurrent states and convolution windows of `num_layers` Gated DeltaNet layers."""

    def __init__(
        self,
        num_layers: int,
        max_seqs: int,
        dims: LinearAttentionConfig,
        dtype: torch.dtype,
        device: torch.device,
        snapshots: int = 0,
    ) -> None:
        heads, dk, dv = dims.num_value_heads, dims.key_head_dim, dims.value_head_dim
        width = dims.conv_kernel - 1  # the window: the inputs before the next position
        r = ROLLBACK_POSITIONS
        f32 = {"dtype": torch.float32, "device": device}
        # [layer, slot, buffer]: the recurrence runs in float32 whatever the weights are.
        self.state = torch.zeros(num_layers, max_seqs, 2, heads, dk, dv, **f32)
        self.window = torch.zeros(
            num_layers, max_seqs, 2, dims.conv_dim, width, dtype=dtype, device=device
        )
        # The last step's per-position inputs, replayed on rollback.
        self.log_k = torch.zeros(num_layers, max_seqs, r, heads, dk, **f32)
        self.log_v = torch.zeros(num_layers, max_seqs, r, heads, dv, **f32)
        self.log_g = torch.zeros(num_layers, max_seqs, r, heads, **f32)
        self.log_beta = torch.zeros(num_layers, max_seqs, r, heads, **f32)
        self.log_conv = torch.zeros(
            num_layers, max_seqs, r, dims.conv_dim, dtype=dtype, device=device
        )
        # Saved states (prefix caching): [layer, slot, snapshot].
        self.saved_state = torch.zeros(num_layers, max_seqs, snapshots, heads, dk, dv, **f32)
        self.saved_window = torch.zeros(
            num_layers, max_seqs, snapshots, dims.conv_dim, width, dtype=dtype, device=device
        )
        self.width = width
        self.current = [0] * max_seqs  # which buffer holds the state after the last step

    @property
    def nbytes(self) -> int:
        tensors = (self.state, self.window, self.log_k, self.log_v, self.log_g, self.log_beta)
        saved = self.saved_state.nbytes + self.saved_window.nbytes
        return sum(t.nbytes for t in tensors) + self.log_conv.nbytes + saved

    @staticmethod
    def bytes_per_slot(
        num_layers: int, dims: LinearAttentionConfig, dtype: torch.dtype, snapshots: int = 0
    ) -> int:
        heads, dk, dv = dims.num_value_heads, dims.key_head_dim, dims.value_head_dim
        states = 2 + snapshots
        f32 = states * heads * dk * dv + ROLLBACK_POSITIONS * heads * (dk + dv + 2)
        windows = states * (dims.conv_kernel - 1)
        activations = (windows + ROLLBACK_POSITIONS) * dims.conv_dim
        return num_layers * (4 * f32 + dtype.itemsize * activations)

    @property
    def num_layers(self) -> int:
        return self.state.shape[0]

    def reset(self, slot: int) -> None:
        """A sequence starting at position 0: zero state, zero window."""
        cur = self.current[slot]
        self.state[:, slot, cur].zero_()
        self.window[:, slot, cur].zero_()

    def save(self, slot: int, index: int) -> None:
        """Copy the slot's current state and window into its snapshot `index`."""
        cur = self.current[slot]
        self.saved_state[:, slot, index] = self.state[:, slot, cur]
        self.saved_window[:, slot, index] = self.window[:, slot, cur]

    def restore(self, slot: int, index: int) -> None:
        """Make the slot's snapshot `index` its current state and window."""
        cur = self.current[slot]
        self.state[:, slot, cur] = self.saved_state[:, slot, index]
        self.window[:, slot, cur] = self.saved_window[:, slot, index]

    def conv_window(self, layer: int, slot: int) -> torch.Tensor:
        """[conv_dim, kernel - 1]: the convolution inputs of the positions before the step."""
        return self.window[layer, slot, self.current[slot]]

    def advance(
        self,
        layer: int,
        slot: int,
        conv_inputs: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
    ) -> torch.Tensor:
        """Run one sequence's new positions through the delta rule from the current state,
        into the other buffer. conv_inputs [conv_dim, kernel - 1 + T]: the window
        followed by the step's convolution inputs; q, k, v, g, beta as `delta_rule`
        takes them. Returns the outputs [T, H, dv]. The buffers flip in `finish_step`."""
        cur = self.current[slot]
        self.window[layer, slot, 1 - cur] = self._last_inputs(conv_inputs)
        before, after = self.state[layer, slot, cur], self.state[layer, slot, 1 - cur]
        count = q.shape[0]
        if count > ROLLBACK_POSITIONS:
            return delta_rule.chunked(after, q, k, v, g, beta, initial=before)
        self.log_k[layer, slot, :count] = k
        self.log_v[layer, slot, :count] = v
        self.log_g[layer, slot, :count] = g
        self.log_beta[layer, slot, :count] = beta
        self.log_conv[layer, slot, :count] = conv_inputs[:, self.width :].T
        return delta_rule.recurrent(after, q, k, v, g, beta, initial=before)

    def _last_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The window after these inputs [conv_dim, columns]: the last `width` columns."""
        return inputs[:, inputs.shape[1] - self.width :]

    def finish_step(self, slot: int) -> None:
        self.current[slot] ^= 1

    def roll_back(self, slot: int, positions: int) -> None:
        """Make the current buffers hold the state after the first `positions` positions
        of the last step (0: the state before it)."""
        if positions == 0:
            self.current[slot] ^= 1
            return
        cur, before = self.current[slot], 1 - self.current[slot]
        for layer in range(self.num_layers):
            for t in range(positions):
                delta_rule.update(
                    self.state[layer, slot, cur],
                    self.log_k[layer, slot, t],
                    self.log_v[layer, slot, t],
                    self.log_g[layer, slot, t],
                    self.log_beta[layer, slot, t],
                    initial=self.state[layer, slot, before] if t == 0 else None,
                )
            inputs = torch.cat(
                [self.window[layer, slot, before], self.log_conv[layer, slot, :positions].T], 1
            )
            self.window[layer, slot, cur] = self._last_inputs(inputs)


class HybridCache(KVCache):
    """The KV cache of a hybrid shard's attention layers plus its linear-attention states.

    Every shard of a hybrid model keeps the rule for what `keep` may be (`keep_error`),
    including a shard with no linear-attention layer: every stage must refuse the same
    steps, or the pipeline's data plane would fall out of lockstep. So every shard also
    records where each slot has saved states, whether or not it holds any.
    """

    def __init__(
        self,
        num_attention_layers: int,
        linear: LinearStates | None,
        max_seqs: int,
        max_context: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        snapshots: int = 0,
    ) -> None:
        super().__init__(
            num_attention_layers, max_seqs, max_context, num_kv_heads, head_dim, dtype, device
        )
        self.linear = linear
        self.snapshots = snapshots
        # Per slot: (first position, positions) of the last step, what a rollback can reach.
        self._last_step: list[tuple[int, int] | None] = [None] * max_seqs
        # Per slot: the positions of its saved states, each with its snapshot index.
        self._saved: list[dict[int, int]] = [{} for _ in range(max_seqs)]

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.linear is None else self.linear.nbytes)

    def slot(self, seq_id: str) -> int:
        new = self.slot_of(seq_id) is None
        slot = super().slot(seq_id)
        if new:
            self._start_over(slot)
        return slot

    def saved_positions(self, slot: int) -> list[int]:
        return sorted(self._saved[slot])

    def keep_error(self, slot: int, keep: int) -> str | None:
        error = super().keep_error(slot, keep)
        if error or keep in (0, self.lengths[slot]) or keep in self._saved[slot]:
            return error
        if self._rolls_back_to(slot, keep):
            return None
        step = self._last_step[slot]
        within = "no step yet" if step is None else f"positions {step[0]}..{sum(step)}"
        return (
            f"keep {keep} cannot be served: a linear-attention state rolls back only within "
            f"the last step's appended positions ({within}), and only for a step of at most "
            f"{ROLLBACK_POSITIONS} positions, or restarts from a saved state "
            f"(at {self.saved_positions(slot) or 'none'})"
        )

    def _rolls_back_to(self, slot: int, keep: int) -> bool:
        step = self._last_step[slot]
        if step is None:
            return False
        start, count = step
        return keep == start or (start < keep < start + count and count <= ROLLBACK_POSITIONS)

    def truncate(self, slot: int, length: int) -> None:
        if length == 0:
            if self.lengths[slot]:  # a new slot starts over in `slot`
                self._start_over(slot)
        elif length != self.lengths[slot]:
            if self._rolls_back_to(slot, length):
                start, _ = self._last_step[slot]
                if self.linear is not None:
                    self.linear.roll_back(slot, length - start)
                self._last_step[slot] = (start, length - start)
            elif length in self._saved[slot]:
                if self.linear is not None:
                    self.linear.restore(slot, self._saved[slot][length])
                self._last_step[slot] = None
            elif self.linear is not None:  # (an MTP head's cache holds no state to cut)
                raise ValueError(self.keep_error(slot, length))
            saved = self._saved[slot]
            for position in [p for p in saved if p > length]:
                del saved[position]
        super().truncate(slot, length)

    def finish_step(self, slots: list[int], starts: list[int], counts: list[int]) -> None:
        """Record a step every layer has run: its positions become the rollback window."""
        for slot, start, count in zip(slots, starts, counts, strict=True):
            self._last_step[slot] = (start, count)
            if self.linear is not None:
                self.linear.finish_step(slot)

    def save_state(self, slot: int) -> None:
        """Keep the slot's state at its current length for a later prefix to restart
        from; beyond `snapshots` saved states the earliest is dropped (the daemon keeps
        the same account)."""
        saved, position = self._saved[slot], self.lengths[slot]
        if not self.snapshots or position in saved:
            return
        if len(saved) == self.snapshots:
            index = saved.pop(min(saved))
        else:
            index = min(set(range(self.snapshots)) - set(saved.values()))
        saved[position] = index
        if self.linear is not None:
            self.linear.save(slot, index)

    def _start_over(self, slot: int) -> None:
        self._last_step[slot] = None
        self._saved[slot].clear()
        if self.linear is not None:
            self.linear.reset(slot)
