"""A request's sampling parameters, checked where they are defined (each error names
its field). Torch-free: the daemon validates requests with it; the sampler that uses
them is `mtpd.model.sampling`. Workers rebuild them from the wire with the same checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from mtpd.model.errors import InvalidParameter

# Below this a temperature means greedy, as vLLM treats it: dividing logits by a
# denormal would overflow them to infinities and sample from NaNs.
GREEDY_BELOW = 1e-5
# Dividing or multiplying logits by a penalty outside this range says nothing a user
# could mean, and near 0 or far above it overflows them.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1  # int64 on the public API
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI bounds them
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300  # token ids a request may bias (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    # OpenAI's: logits[t] -= frequency_penalty * n_t + presence_penalty * (n_t > 0), with
    # n_t the times t was generated so far (the prompt does not count), and
    # logit_bias[t] added to logits[t] first.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

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
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise bad(name, f"must be in [{low}, {high}]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParameter(
                f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}",
                "logit_bias",
            )
        low, high = LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and 0 <= token <= MAX_INT32):
                raise InvalidParameter(f"logit_bias: {token!r} is not a token id", "logit_bias")
            if not (math.isfinite(bias) and low <= bias <= high):
                raise InvalidParameter(
                    f"logit_bias[{token}]: must be in [{low}, {high}], got {bias!r}",
                    f"logit_bias[{token}]",
                )
        object.__setattr__(self, "logit_bias", dict(self.logit_bias))  # a wire map, say
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processed(self) -> bool:
        """Whether logits are changed before a token is chosen (a penalty or a bias)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Every biased token in a vocabulary of `vocab_size` (the model's, known late)."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise InvalidParameter(
                    f"logit_bias: token id {token} is outside the vocabulary ({vocab_size} ids)",
                    "logit_bias",
                )
