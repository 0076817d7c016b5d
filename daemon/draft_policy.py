"""How many tokens to draft: fixed, or chosen per sequence to maximise tokens per second.

The output never depends on this choice (verification is exact), only the speed does.
With acceptance c_j at draft position j (conditional on the earlier ones being
accepted), a step drafting k tokens emits E(k) = 1 + sum_i prod_{j<=i} c_j tokens on
average. In a batch of b sequences the step then emits b - 1 + E(k) tokens (the others
one each) and costs T(k) = V(b + k) + D1 + D (k - 1): a pipeline pass over b + k
positions and k passes of the head (none for k = 0: the head catches its cache up in
the next step that drafts, `mtpd.worker.drafter`). The first pass (D1) runs the head
over the step's verified rows and costs more than each later one (D), a row per
sequence drafting on (int4, one stream: 0.65 against 0.37 ms); priced alike, two drafts
looked dearer than they are. V(n) is the measured mean time of passes over n
positions where such passes were seen, else the line alpha + beta * n fitted online to
every pass, continued from the measured sizes below n; never less than a smaller size's
measured mean. A line alone is not enough: a pass's cost need not grow evenly with its
rows (oneDNN once changed kernels at the third row, which cost twice what the second
did), so a policy trusting the line drafts two tokens where one pays better. The policy
picks the k in 0..6 with the largest (b - 1 + E(k)) / T(k), drafting one token every
few steps even at k = 0 so acceptance keeps being measured (every 8 steps, backing off
to every 64 as first drafts keep being rejected, or every 256 from the start once the
server has measured its rates and none of the sequence's drafts was accepted, and that
times the batch: a batch explores as often as one sequence), but only where a sequence
accepting 0.9 would gain 5% by drafting; a sequence's acceptance starts from the
server-wide rates and moves to its own.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from mtpd.model.errors import InvalidParameter
from mtpd.v1 import worker_pb2 as pb

AUTO = "auto"
MAX_DRAFT = 6  # the longest draft `auto` considers
_PRIOR_WEIGHT = 8.0  # how many observations the server-wide rate is worth per sequence
_FORGET = 0.98  # per step, for the cost fit
_EXPLORE_EVERY = 8  # with k = 0 chosen, draft one token every this many steps anyway,
_EXPLORE_BACKOFF = 3  # doubled for each first draft rejected, up to this many times
# Where the server's verdict alone keeps a sequence at k = 0, every 256 steps: at
# acceptance 0.1, one stream, exploring every 64 steps cost `auto` about 1% of MTP off
# (about one exploration per 64-token request, each a step's worth of head passes).
_VERDICT_BACKOFF = 5
_SERVER_EVIDENCE = 16  # first drafts the server has measured before new sequences back off
_MEASURED = 3.0  # weight of observations before a pass size's mean replaces the line
_SIZES = 512  # pass sizes (positions) whose mean time is kept
# The acceptance of the most predictable text (repeated or formulaic: the shipped head
# averages 0.5), and the gain drafting would have to bring a sequence accepting that
# for its sequences to be explored. An exploration costs the whole step a head pass, a
# position and the head's catch-up over what the sequence held back; where the best a
# sequence could gain is a few percent (8 int4 streams: 2-3%), exploring cost `auto`
# 1-3% of MTP off.
_HOPE = 0.9
_EXPLORE_GAIN = 1.05
# Once this many steps are fitted, the step costs are priced again every _REPRICE steps,
# not after each: pricing takes 25-60 us, about 0.5% of a one-stream int4 step, and the
# fit (forgetting 2% a step) moves little in a few.
_SETTLED = 64
_REPRICE = 8


@dataclass
class DraftStats:
    """Speculative decoding of a request (or of the server): per draft position, how
    often a draft was verified there, reached (every earlier draft accepted) and
    accepted; and where the time of the steps it took part in went (a step shared by a
    batch counts for each of its sequences in their own stats, once in the server's)."""

    steps: int = 0  # verification steps after the prompt
    tokens: int = 0  # tokens those steps emitted
    drafted: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)  # drafted, every earlier one accepted
    accepted: list[int] = field(default_factory=list)
    verify_s: float = 0.0  # the trunk on every stage (verification included)
    draft_s: float = 0.0  # the MTP head on the tail
    transport_s: float = 0.0  # activations between stages
    # Where in the exploring interval this sequence's steps fall (DraftPolicy.choose).
    phase: int = field(default_factory=lambda: random.randrange(1 << 20))

    def add_times(self, timings: list[pb.StepTimings]) -> None:
        draft = timings[-1].draft_s
        self.draft_s += draft
        self.verify_s += sum(t.compute_s for t in timings) - draft
        self.transport_s += sum(
            max(0.0, b.input_ready_at - a.computed_at) for a, b in itertools.pairwise(timings)
        )

    def add(self, drafted: int, accepted: int, emitted: int) -> None:
        self.steps += 1
        self.tokens += emitted
        while len(self.drafted) < drafted:
            self.drafted.append(0)
            self.reached.append(0)
            self.accepted.append(0)
        for j in range(drafted):
            self.drafted[j] += 1
            self.reached[j] += j <= accepted
            self.accepted[j] += j < accepted

    def merge(self, other: DraftStats) -> None:
        """Add another request's counts (server-wide and benchmark totals)."""
        self.steps += other.steps
        self.tokens += other.tokens
        self.verify_s += other.verify_s
        self.draft_s += other.draft_s
        self.transport_s += other.transport_s
        for name in ("drafted", "reached", "accepted"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, n in enumerate(theirs):
                mine[j] += n

    @property
    def acceptance_by_position(self) -> list[float]:
        """Of the steps that drafted position i, the share where it was accepted."""
        # Not strict: a reader may see the lists while add() lengthens them one by one.
        return [a / d for a, d in zip(self.accepted, self.drafted, strict=False)]

    @property
    def conditional_acceptance_by_position(self) -> list[float]:
        """Of the drafts at position i whose earlier drafts were all accepted, the share
        accepted (what the cost model uses)."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached, strict=True)]

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


class DraftPolicy:
    def __init__(self, setting: int | str = AUTO, p_min: float = 0.0) -> None:
        if not 0 <= p_min < 1:
            raise InvalidParameter(f"--draft-p-min must be in [0, 1), got {p_min}")
        self.setting, self.p_min = setting, p_min
        self.server = DraftStats()  # every sequence's steps: the prior for new ones
        # Weighted least squares of step time on positions, with forgetting.
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._by_size: dict[int, tuple[float, float]] = {}  # positions: (weight, sum)
        # alpha, beta and the well-measured (size, mean) pairs, sorted; None once stale.
        self._costs: tuple[float, float, list[tuple[int, float]]] | None = None
        self._step_costs_for: tuple[tuple[int, int], tuple[list[float], bool, bool]] | None = None
        self.first_pass_s = self.next_pass_s = 0.0  # D1 and D: 0 until measured
        self._observed = 0  # steps fitted

    @property
    def enabled(self) -> bool:
        return self.setting != 0

    def observe_step(
        self,
        positions: int,
        step_s: float,
        draft_s: float,
        catch_up_s: float,
        passes: int,
        first_s: float,
    ) -> None:
        """Fit the cost model to one completed step: `passes` head passes took `draft_s`,
        the first of them `first_s` (0 where a worker does not say: the passes are then
        taken as alike). The head's catch-up on entries held back (`catch_up_s`, in the
        first pass) stays out of the cost of a pass: counted in, a sequence pausing made
        its next drafts look expensive, which paused it longer and grew the next
        catch-up (a 1-stream run measured 2.8 ms a pass for a 0.9 ms one, and chose k = 0
        in half its steps)."""
        x, y = float(positions), step_s - draft_s
        f = _FORGET
        self._sw, self._sx, self._sy = f * self._sw + 1, f * self._sx + x, f * self._sy + y
        self._sxx, self._sxy = f * self._sxx + x * x, f * self._sxy + x * y
        if positions <= _SIZES:
            w, total = self._by_size.get(positions, (0.0, 0.0))
            self._by_size[positions] = (f * w + 1, f * total + y)
        self._observed += 1
        if self._observed < _SETTLED or self._observed % _REPRICE == 0:
            self._costs = self._step_costs_for = None
        if passes:
            reported = 0 < first_s <= draft_s
            # The catch-up ran in the first pass; unreported, the passes share it alike.
            first = first_s - catch_up_s if reported else (draft_s - catch_up_s) / passes
            self.first_pass_s = _mean_on(self.first_pass_s, max(first, 0.0))
            if passes > 1 and reported:
                later = (draft_s - first_s) / (passes - 1)
                self.next_pass_s = _mean_on(self.next_pass_s, later)

    def cost_fit(self) -> tuple[float, float]:
        """(alpha, beta) of V(n) = alpha + beta * n: seconds once fitted, relative units
        before (verification is mostly weight reads: extra positions cost little)."""
        if self._sw < 2:
            return 1.0, 0.05
        mean_x, mean_y = self._sx / self._sw, self._sy / self._sw
        var = self._sxx / self._sw - mean_x * mean_x
        if var <= 1e-9:
            # One pass size seen: no slope to fit. Assume the worst, a cost in proportion
            # to positions, until another size is measured. A flat line had made every
            # draft look free to a batch whose sequences all chose the same k, and kept
            # it there (8 int4 streams at 0.93x MTP off, session 12).
            return 1e-6, mean_y / max(mean_x, 1.0)
        beta = max((self._sxy / self._sw - mean_x * mean_y) / var, 0.0)
        return max(mean_y - beta * mean_x, 1e-6), beta

    def pass_cost(self, positions: int) -> float:
        """V(positions): the measured mean where passes of this size were seen enough,
        else the fitted line, continued from any measured size below. No size looks
        cheaper than a smaller one measured: more positions never cost less, and a mean
        measured in a quiet minute (session 10: 4 positions at 6.7 ms, 3 at 7.2) had
        made three drafts look cheaper than two."""
        if self._costs is None:  # once per pricing (observe_step), not per sequence and k
            measured = ((n, t / w) for n, (w, t) in self._by_size.items() if w >= _MEASURED)
            self._costs = (*self.cost_fit(), sorted(measured))
        alpha, beta, measured = self._costs
        cost, floor = alpha + beta * positions, 0.0
        for n, mean in measured:
            if n == positions:
                return max(mean, floor)
            if n > positions:
                break
            floor = max(floor, mean)
            cost = max(cost, mean + beta * (positions - n))
        return cost

    def rates(self, own: DraftStats) -> list[float]:
        """Conditional acceptance by position: the sequence's own, pulled towards the
        server's while it has few observations."""
        out = []
        for j in range(MAX_DRAFT):
            server = (_at(self.server.accepted, j) + 1) / (_at(self.server.reached, j) + 2)
            mine, tries = _at(own.accepted, j), _at(own.reached, j)
            out.append((mine + _PRIOR_WEIGHT * server) / (tries + _PRIOR_WEIGHT))
        return out

    def choose(self, own: DraftStats, limit: int, batch: int = 1) -> int:
        """Drafts to request for a sequence's next step (at most `limit`), when it
        shares steps with `batch` sequences (which share the fixed cost of a pass)."""
        if limit <= 0:
            return 0
        if self.setting != AUTO:
            return min(int(self.setting), limit)
        batch = max(batch, 1)
        steps, worth_exploring, can_pay = self._step_costs(batch, min(MAX_DRAFT, limit))
        # Where even drafts always accepted would not pay, no sequence's rates can make
        # them: most steps of a large batch decide here, without the rates.
        best = _best(self.rates(own), batch, steps)[0] if can_pay else 0
        if best or not worth_exploring:
            return best
        # A batch explores as often as one sequence would: each exploring row is paid
        # for by the whole step (an extra position and a head pass it did not need). The
        # phase spreads the sequences' explorations over steps.
        # Once the server's rates are measured, k = 0 for a sequence none of whose
        # drafts was accepted is the server's verdict, not a guess: it explores backed
        # off (at acceptance 0.1, exploring every 8 steps of every new request cost
        # `auto` 3-6% against MTP off, every 64 about 1%). One accepted draft puts it on
        # its own record.
        if _at(self.server.drafted, 0) >= _SERVER_EVIDENCE and not _at(own.accepted, 0):
            doublings = _VERDICT_BACKOFF
        else:
            doublings = min(_at(own.drafted, 0) - _at(own.accepted, 0), _EXPLORE_BACKOFF)
        every = (_EXPLORE_EVERY << doublings) * batch
        if (own.steps + own.phase) % every == every - 1:
            return 1  # keep measuring, so a sequence that turns predictable is noticed
        return 0

    def _step_costs(self, batch: int, most: int) -> tuple[list[float], bool, bool]:
        """T(k) for k = 0..most drafts of one sequence in a batch of `batch` (the pass
        over batch + k positions and k passes of the head); whether exploring is worth
        it there: whether a sequence as predictable as text gets (acceptance _HOPE at
        every position) would gain _EXPLORE_GAIN by drafting; and whether drafting can
        pay at all (drafts always accepted choose k > 0). Where even it would
        not, exploring measures nothing that could pay for itself, and each exploration
        costs the whole step a head pass and the head's catch-up over the entries the
        sequence held back (2-3 ms on an 8-stream int4 step of 9.4, session 17). Kept
        until observe_step prices again, so a batch's sequences share one computation."""
        key = (batch, most)
        if self._step_costs_for is not None and self._step_costs_for[0] == key:
            return self._step_costs_for[1]
        measured = self._sw >= 2 and self.first_pass_s > 0
        first = self.first_pass_s if measured else 0.1 * self.cost_fit()[0]
        later = self.next_pass_s if measured and self.next_pass_s else first
        steps = [
            self.pass_cost(batch + k) + (first + later * (k - 1) if k else 0.0)
            for k in range(most + 1)
        ]
        _, hoped = _best([_HOPE] * MAX_DRAFT, batch, steps)
        can_pay = _best([1.0] * MAX_DRAFT, batch, steps)[0] > 0
        costs = steps, hoped >= _EXPLORE_GAIN * batch / steps[0], can_pay
        self._step_costs_for = (key, costs)
        return costs


def _best(rates: list[float], batch: int, steps: list[float]) -> tuple[int, float]:
    """The k whose (batch - 1 + E(k)) / T(k) is largest, and that rate: the batch's
    tokens per second with this sequence drafting k and the others one token each (its
    drafts lengthen everyone's step). Priced as if every sequence drafted k (their pass
    and the head's shared), a sequence whose own record beat the server's drafted where
    the step then grew for all, and 8 int4 streams ran at 0.89x MTP off."""
    best, best_rate, emitted, chain = 0, 0.0, float(batch), 1.0
    for k, cost in enumerate(steps):
        if k:
            chain *= rates[k - 1]
            emitted += chain
        if emitted / cost > best_rate:
            best, best_rate = k, emitted / cost
    return best, best_rate


def _mean_on(mean: float, value: float) -> float:
    """A running mean that follows the recent passes (the first value starts it)."""
    return value if not mean else 0.9 * mean + 0.1 * value


def _at(counts: list[int], j: int) -> int:
    return counts[j] if j < len(counts) else 0
