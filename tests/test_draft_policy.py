"""The `auto` draft policy's choice of draft length, from measured acceptance and costs."""

from __future__ import annotations

from mtpd.daemon.draft_policy import AUTO, DraftPolicy, DraftStats

DRAFT_PASS_S = 0.003


def steady_sequence(rate: float) -> DraftStats:
    """A sequence with a long record of drafts accepted at `rate` at each position."""
    reached = [1000, int(1000 * rate), int(1000 * rate * rate)]
    accepted = [int(n * rate) for n in reached]
    # Phase 0: step 1000 is not one where a sequence explores (that is chosen apart).
    return DraftStats(steps=1000, drafted=[1000] * 3, reached=reached, accepted=accepted, phase=0)


def observe(policy: DraftPolicy, positions: int, pass_s: float, times: int = 4) -> None:
    for _ in range(times):
        policy.observe_step(
            positions, pass_s + DRAFT_PASS_S, DRAFT_PASS_S, 0.0, passes=1, first_s=DRAFT_PASS_S
        )


def test_a_measured_jump_in_pass_cost_overrules_the_fitted_line():
    policy, seq = DraftPolicy(AUTO), steady_sequence(0.45)
    # Passes over 1 and 2 positions seen: the line through them says each position adds
    # 6 ms, so two drafts (a pass over 3 positions) look best.
    observe(policy, 1, 0.100, times=20)
    observe(policy, 2, 0.106, times=20)
    assert policy.choose(seq, limit=6) == 2
    # Measured, the third position costs 24 ms (a slower kernel): one draft pays better,
    # and the sizes beyond are no cheaper than the one measured below them.
    observe(policy, 3, 0.130)
    assert policy.choose(seq, limit=6) == 1
    assert policy.pass_cost(5) >= 0.130


def test_a_bigger_pass_never_looks_cheaper_than_a_smaller_one():
    # Session 10's int4 bench: means measured at different minutes put a pass over 4
    # positions below one over 3, and `auto` drafted three tokens where one paid best.
    policy, seq = DraftPolicy(AUTO), steady_sequence(0.45)
    for positions, pass_s in ((1, 0.0043), (2, 0.0052), (3, 0.0072), (4, 0.0055)):
        for _ in range(4):
            policy.observe_step(positions, pass_s + 0.0003, 0.0003, 0.0, passes=1, first_s=0.0003)
    assert policy.pass_cost(4) >= policy.pass_cost(3) >= 0.0072
    # Priced at 5.5 ms, three drafts would look best (1.74 tokens for 6.4 ms).
    assert policy.choose(seq, limit=6) == 1


def test_in_a_batch_a_draft_pays_for_the_steps_growth_not_for_a_whole_pass():
    policy, seq = DraftPolicy(AUTO), steady_sequence(0.45)
    # Alone, a second position costs 60%; in a batch of four, a fifth position costs 2%
    # of the step and a sixth 20%: the sequence drafts one token there and not alone.
    for positions, pass_s in ((1, 0.100), (2, 0.160), (4, 0.200), (5, 0.204), (6, 0.240)):
        observe(policy, positions, pass_s)
    assert policy.choose(seq, limit=6, batch=1) == 0
    assert policy.choose(seq, limit=6, batch=4) == 1


def test_one_sequence_drafting_lengthens_every_sequences_step():
    # Measured at 8 streams of int4 (session 10): a pass over 8 positions 10.8 ms, over
    # 16 19.4 ms, a head pass 1.3 ms. A sequence that drafts adds a position (1.1 ms on
    # the line) and a head pass to the step all 8 wait for: 8.95 tokens for 13.2 ms lose
    # to 8 for 10.8 even at acceptance 0.95. Priced as if the whole batch drafted (its
    # share of a pass over 16), the draft had looked as if it paid, and 8 streams ran
    # at 0.89x MTP off. Alone, with the same costs, it pays.
    policy = DraftPolicy(AUTO)
    for positions, pass_s in ((8, 0.0108), (16, 0.0194)):
        for _ in range(4):
            policy.observe_step(positions, pass_s + 0.0013, 0.0013, 0.0, passes=1, first_s=0.0013)
    assert policy.choose(steady_sequence(0.95), limit=6, batch=8) == 0
    assert policy.choose(steady_sequence(0.45), limit=6, batch=8) == 0
    alone = DraftPolicy(AUTO)
    for positions, pass_s in ((1, 0.0050), (2, 0.0056)):
        for _ in range(4):
            alone.observe_step(positions, pass_s + 0.0013, 0.0013, 0.0, passes=1, first_s=0.0013)
    assert alone.choose(steady_sequence(0.95), limit=6) >= 1


def test_a_catch_up_after_a_pause_is_not_billed_to_drafting():
    # A pass that also catches the head up on 40 entries held back while the sequence
    # drafted nothing takes 3.2 ms, of which 2.4 ms is the catch-up; a draft's own pass
    # costs 0.8. Billed whole, the pause's cost made drafting look 4x dearer (the
    # sequence then paused more, and its next catch-up grew).
    policy, seq = DraftPolicy(AUTO), steady_sequence(0.5)
    for positions, pass_s in ((1, 0.0040), (2, 0.0044)):
        for _ in range(4):
            policy.observe_step(
                positions, pass_s + 0.0032, 0.0032, 0.0024, passes=1, first_s=0.0032
            )
    assert abs(policy.first_pass_s - 0.0008) < 1e-9
    assert policy.choose(seq, limit=6) == 1
    for positions, pass_s in ((1, 0.0040), (2, 0.0044)):
        for _ in range(40):
            policy.observe_step(positions, pass_s + 0.0032, 0.0032, 0.0, passes=1, first_s=0.0032)
    assert policy.choose(seq, limit=6) == 0  # 1.5 tokens for 7.6 ms lose to 1 for 4.0


def test_a_drafts_first_head_pass_is_priced_apart_from_the_later_ones():
    # The first pass runs the head over the step's verified rows (1.0 ms here), each
    # later one a row (0.2 ms). Priced alike at their mean, a second draft looked dearer
    # than it is and one draft won (1.55 tokens for 5.26 ms against 1.85 for 6.34);
    # priced apart, two drafts (1.85 tokens for 5.94 ms) beat one (1.55 for 5.46).
    def measured(first_reported: bool) -> DraftPolicy:
        policy = DraftPolicy(AUTO)
        for _ in range(20):
            for positions, pass_s, passes in ((1, 0.0036, 0), (4, 0.0054, 0), (2, 0.00446, 1)):
                draft_s = 0.0008 * passes + 0.0002 if passes else 0.0
                first_s = 0.001 if passes and first_reported else 0.0
                policy.observe_step(positions, pass_s + draft_s, draft_s, 0.0, passes, first_s)
            policy.observe_step(3, 0.00474 + 0.0012, 0.0012, 0.0, 2, first_reported and 0.001)
        return policy

    seq = steady_sequence(0.55)
    apart = measured(first_reported=True)
    assert abs(apart.first_pass_s - 0.001) < 1e-9 and abs(apart.next_pass_s - 0.0002) < 1e-9
    assert apart.choose(seq, limit=6) == 2
    alike = measured(first_reported=False)  # a worker that does not say: passes alike
    assert alike.choose(seq, limit=6) == 1


def test_an_unreported_first_pass_shares_the_catch_up_and_no_pass_costs_less_than_nothing():
    # A worker that does not report its first pass (an older one: the field reads 0):
    # 3 passes of 3 ms, 2 of them catching up, cost 1/3 ms a pass, not 3/3 - 2.
    policy = DraftPolicy(AUTO)
    policy.observe_step(1, 0.007, 0.003, 0.002, passes=3, first_s=0.0)
    assert abs(policy.first_pass_s - 0.001 / 3) < 1e-12
    # Reported, a catch-up beyond the first pass's time (clocks apart) counts as 0.
    policy = DraftPolicy(AUTO)
    policy.observe_step(1, 0.007, 0.003, 0.002, passes=2, first_s=0.001)
    assert policy.first_pass_s == 0.0 and abs(policy.next_pass_s - 0.002) < 1e-12


def test_fixed_settings_and_limits_are_kept():
    seq = steady_sequence(0.9)
    assert DraftPolicy(3).choose(seq, limit=6) == 3
    assert DraftPolicy(3).choose(seq, limit=2) == 2
    assert DraftPolicy(AUTO).choose(seq, limit=0) == 0


def exploring_steps(
    policy: DraftPolicy, rejected: int, batch: int, accepted: int = 0, span: int = 128
) -> list[int]:
    """The steps of `span` where a sequence with this record of first drafts drafts."""
    tried = [rejected + accepted]
    seq = DraftStats(steps=0, drafted=tried, reached=tried, accepted=[accepted], phase=0)
    steps = []
    for step in range(span):
        seq.steps = step
        if policy.choose(seq, limit=6, batch=batch):
            steps.append(step)
    return steps


def test_a_sequence_accepting_every_draft_drafts_where_only_it_could_pay():
    """In a batch of 8 whose ninth position and head pass cost 11.5% of the step, only a
    sequence accepting nearly every draft gains by drafting: it drafts, one accepting 0.9
    does not. A step dearer still, and no sequence can gain (the policy then decides
    without looking at any sequence's rates)."""
    for ninth_s, drafts in ((0.1085, True), (0.1115, False)):
        policy = DraftPolicy(AUTO)
        observe(policy, 8, 0.100)
        observe(policy, 9, ninth_s)
        assert (policy.choose(steady_sequence(1.0), 6, batch=8) > 0) == drafts
        assert policy.choose(steady_sequence(0.9), 6, batch=8) == 0


def test_no_exploring_where_drafting_could_not_pay():
    """Session 17's 8 int4 streams: each exploration made the whole step pay a head
    pass and the head's catch-up over the entries held back (2-3 ms of 9.4). Where
    drafting would lose even at acceptance 0.9 (a position costs 10% of the step, a
    head pass 28%), no sequence explores; alone, where it would pay, they do."""
    policy = DraftPolicy(AUTO)
    for positions, pass_s in ((8, 0.0108), (16, 0.0194)):
        observe(policy, positions, pass_s)
    assert exploring_steps(policy, 0, batch=8) == []
    alone = DraftPolicy(AUTO)
    observe(alone, 1, 0.100)
    observe(alone, 2, 0.150)
    assert exploring_steps(alone, 0, batch=1) == list(range(7, 128, 8))


def test_no_exploring_where_drafting_could_gain_little():
    """Today's 8 int4 streams: each position and each head pass add some 9% to the step,
    so a sequence accepting 0.9 would gain at most 3% (at any draft length), less than
    exploring costs (a head pass and its catch-up: `auto` at acceptance 0.1 ran 1-3%
    behind MTP off). Where drafting could gain 5% or more, sequences explore."""
    # The 8-position pass takes 0.1 s; at 0.9 a sequence gains 2.9%, 4.0%, 5.2%, 23%.
    cases = ((0.106, False), (0.1055, False), (0.105, True), (0.101, True))
    for ninth_s, explores in cases:
        policy = DraftPolicy(AUTO)
        observe(policy, 8, 0.100)
        observe(policy, 9, ninth_s)
        assert bool(exploring_steps(policy, 0, batch=8)) == explores


def test_exploring_backs_off_while_first_drafts_are_rejected():
    """With k = 0 chosen, one draft every 8 steps keeps acceptance measured; each first
    draft rejected doubles the interval, to every 64 steps (every 256 from the start
    once the server has measured its rates and the sequence has no accepted draft); in
    a batch of b, b times as long."""
    policy = DraftPolicy(AUTO)
    observe(policy, 1, 0.100)
    # A second position costs 50%: k = 0 at the rates these sequences have, k = 1 for
    # one accepting 0.9 (so exploring can find such a one).
    observe(policy, 2, 0.150)
    # In a batch of 4, the same: k = 0 at acceptance 0.5, drafting pays at 0.9.
    observe(policy, 4, 0.200)
    observe(policy, 5, 0.227)

    def explored(rejected: int, batch: int = 1, accepted: int = 0) -> list[int]:
        return exploring_steps(policy, rejected, batch, accepted, span=512)

    assert explored(0) == list(range(7, 512, 8))
    assert explored(1) == list(range(15, 512, 16))
    assert explored(3) == explored(10) == list(range(63, 512, 64))
    assert explored(0, batch=4) == list(range(31, 512, 32))  # the batch, as one sequence
    # Once the server has measured first drafts, a new sequence starts backed off further.
    policy.server.drafted, policy.server.reached, policy.server.accepted = [16], [16], [2]
    assert explored(0) == explored(3) == [255, 511]
    # One accepted draft of its own puts a sequence back on its own record.
    assert explored(0, accepted=1) == list(range(7, 512, 8))
    assert explored(3, accepted=1) == list(range(63, 512, 64))


def test_a_settled_fit_is_priced_again_within_a_few_steps():
    """Past its first steps the policy reprices every few observed steps, not after
    each (pricing costs a one-stream step about 0.5%): a change in what passes cost
    reaches its choice within that many steps."""
    policy, seq = DraftPolicy(AUTO), steady_sequence(0.45)
    observe(policy, 1, 0.100, times=40)
    observe(policy, 2, 0.101, times=40)
    assert policy.choose(seq, limit=6) > 0  # a second position nearly free: drafting pays
    choices = []
    for _ in range(40):  # now a second position costs twice a pass
        observe(policy, 2, 0.300, times=1)
        choices.append(policy.choose(seq, limit=6))
    switched = choices.index(0)
    assert choices[switched:] == [0] * (40 - switched)
    # Priced from every step it would have switched here, give or take the steps
    # between pricings.
    fresh = DraftPolicy(AUTO)
    observe(fresh, 1, 0.100, times=40)
    observe(fresh, 2, 0.101, times=40)

    def priced_now() -> int:
        observe(fresh, 2, 0.300, times=1)
        fresh._costs = fresh._step_costs_for = None
        return fresh.choose(seq, limit=6)

    at_once = next(i for i in range(40) if priced_now() == 0)
    assert at_once <= switched < at_once + 8
