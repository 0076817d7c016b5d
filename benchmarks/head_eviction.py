"""What the MTP head's pass costs the trunk's next step, beyond its own time: `Stage.run`
on the int4 default model, one sequence verifying one draft a step (a fixed token, so
every mode does the same trunk work), in blocks of steps:

- MTP off;
- MTP off, with a read of `--read-mb` of other memory between steps (as much as the
  head's weights);
- MTP off, with `--busy-ms` of arithmetic between steps that reads nothing beyond the
  core's own caches (small matrix products on both threads);
- the head drafting every step (its drafts discarded).

The trunk's time is the worker's compute less the head's (`draft_s`). A step re-reads
the same ~95 MB of weights, and on this machine part of them still sits in its large
shared L3 from the step before. Session 27 read the head's penalty as eviction by its
bytes; session 28 found that time away from the weights costs as much without reading
anything (the busy mode), and that sharing the head's 4.7 MB of draft rows with the LM
head left the penalty where it was: the weights fade from the L3 with time, as the
machine's other tenants use it, and whatever runs between trunk steps pays for that too.

    python benchmarks/head_eviction.py [--blocks 4] [--steps 100] [--read-mb 10.7]
                                       [--busy-ms 0.5,1,2]

Written for issue 24 (docs/speculative-decoding.md, sessions 27 and 28). Run it alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from draft_pass import GREEDY, PROMPT, int4_tail_stage  # this folder's

from mtpd.v1 import worker_pb2 as pb

DRAFT = 7  # a fixed draft: rejected alike in every mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--read-mb", type=float, default=10.7)
    ap.add_argument("--busy-ms", default="0.5,1,2")
    args = ap.parse_args()
    stage = int4_tail_stage(2)
    other, small = torch.ones(int(args.read_mb * 1e6 / 4)), torch.randn(128, 128)

    def busy(ms: float) -> None:
        until = time.perf_counter() + ms / 1e3
        while time.perf_counter() < until:
            torch.mm(small, small)

    between = {"MTP off": None, f"MTP off, {args.read_mb:g} MB read between steps": other.sum}
    for ms in (float(v) for v in args.busy_ms.split(",")):
        between[f"MTP off, {ms:g} ms busy in cache between steps"] = functools.partial(busy, ms)
    drafting = "the head drafting"
    modes = [*between, drafting]
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for block in range(args.blocks):
        for n, mode in enumerate(modes if block % 2 == 0 else modes[::-1]):
            name = f"{block}-{n}"
            opened = pb.SequenceOpen(seq_id=name, sampling=GREEDY, no_mtp=mode != drafting)
            first = pb.SequenceStep(seq_id=name, keep=0, token_ids=PROMPT, sample=True)
            reply = stage.run(pb.StepRequest(step_id=1, sequences=[first], open=[opened]))
            at, last = len(PROMPT), reply.results[0].token_ids[-1]
            for i in range(args.steps):
                if between.get(mode):
                    between[mode]()
                step = pb.SequenceStep(
                    seq_id=name,
                    keep=at,
                    token_ids=[last, DRAFT],
                    sample=True,
                    verify=1,
                    draft_tokens=1 if mode == drafting else 0,
                )
                reply = stage.run(pb.StepRequest(step_id=2 + i, sequences=[step]))
                result, t = reply.results[0], reply.timings
                if i >= 10:  # past the block's first steps
                    times[mode].append((t.compute_s - t.draft_s, t.draft_s))
                at, last = at + 1 + result.accepted, result.token_ids[-1]
            stage.run(pb.StepRequest(step_id=0, release=[name]))
    for mode, values in times.items():
        trunk = 1e3 * statistics.median(v[0] for v in values)
        head = 1e3 * statistics.median(v[1] for v in values)
        print(f"{mode:48s} trunk {trunk:.3f} ms, head {head:.3f} ms (medians of {len(values)})")


if __name__ == "__main__":
    main()
