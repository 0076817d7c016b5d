"""A fault tests inject into a worker, to show that a request which crashes its worker is
quarantined. Off unless the worker's environment sets MTPD_TEST_CRASH_ON_TOKEN=ID: then
the first stage fails (raises, as an indexing bug would) every step in which a sequence
starts (keep 0: a prompt, or a replay) with token ID among its tokens. Drafts never
start a sequence, so only what a sequence really holds sets it off. Nothing in a
request can switch it on."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from mtpd.v1 import worker_pb2 as pb

ENV = "MTPD_TEST_CRASH_ON_TOKEN"

log = logging.getLogger("mtpd.worker")


class InjectedFault(RuntimeError):
    pass


def fault_from_env() -> Callable[[Sequence[pb.SequenceStep]], None] | None:
    setting = os.environ.get(ENV)
    if not setting:
        return None
    poison = int(setting)
    log.warning("%s=%d: steps starting a sequence with it fail (a test's fault)", ENV, poison)

    def crash(sequences: Sequence[pb.SequenceStep]) -> None:
        if any(s.keep == 0 and poison in s.token_ids for s in sequences):
            raise InjectedFault(f"{ENV}: token {poison} in the step")

    return crash
