"""A request's sampling parameters, checked where they are defined (each error names
its field). Torch-free: the daemon validates requests with it; the sampler that uses
them is `mtpd.model.sampling`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtpd.model.errors import InvalidParameter


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidParameter:
            return InvalidParameter(f"{field} {why}, got {getattr(self, field)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 turns it off)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p < 1):
            raise bad("min_p", "must be in [0, 1)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "must be a finite number > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
