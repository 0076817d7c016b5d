"""A request's sampling parameters, checked where they are defined (each error names
its field). Torch-free: the daemon validates requests with it; the sampler that uses
them is `mtpd.model.sampling`. Workers rebuild them from the wire with the same checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtpd.model.errors import InvalidParameter

# Below this a temperature means greedy, as vLLM treats it: dividing logits by a
# denormal would overflow them to infinities and sample from NaNs.
GREEDY_BELOW = 1e-5
# Dividing or multiplying logits by a penalty outside this range says nothing a user
# could mean, and near 0 or far above it overflows them.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1  # int64 on the public API


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidParameter:
            return InvalidParameter(f"{field} {why}, got {getattr(self, field)!r}", field)

        low, high = REPETITION_PENALTY_RANGE
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0")
        if not 0 <= self.top_k <= MAX_INT32:
            raise bad("top_k", f"must be in 0..{MAX_INT32} (0 turns it off)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p < 1):
            raise bad("min_p", "must be in [0, 1)")
        if not low <= self.repetition_penalty <= high:
            raise bad("repetition_penalty", f"must be in [{low}, {high}]")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be in 0..{MAX_SEED}")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
