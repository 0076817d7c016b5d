"""What the MTP head's pass costs the trunk's next step, beyond its own time: `Stage.run`
on the int4 default model, one sequence verifying one draft a step (a fixed token, so
every mode does the same trunk work), in blocks of steps:

- MTP off;
- MTP off, with a read of `--read-mb` of other memory between steps (as much as the
  head's weights);
- the head drafting every step (its drafts discarded).

The trunk's time is the worker's compute less the head's (`draft_s`). A step re-reads
the same ~95 MB of weights, and part of them still sits in this machine's large L3 from
the step before: whatever else streams through the caches in between evicts some, and
the next step reads that much more from memory.

    python benchmarks/head_eviction.py [--blocks 4] [--steps 100] [--read-mb 10.7]

Written for issue 24 (docs/speculative-decoding.md, session 27). Run it alone.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from draft_pass import GREEDY, PROMPT, int4_tail_stage  # this folder's

from mtpd.v1 import worker_pb2 as pb

DRAFT = 7  # a fixed draft: rejected alike in every mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--read-mb", type=float, default=10.7)
    args = ap.parse_args()
    stage = int4_tail_stage(2)
    other = torch.ones(int(args.read_mb * 1e6 / 4))
    modes = ("MTP off", f"MTP off, {args.read_mb:g} MB read between steps", "the head drafting")
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for block in range(args.blocks):
        for n, mode in enumerate(modes if block % 2 == 0 else modes[::-1]):
            name = f"{block}-{n}"
            opened = pb.SequenceOpen(seq_id=name, sampling=GREEDY, no_mtp=mode != modes[2])
            first = pb.SequenceStep(seq_id=name, keep=0, token_ids=PROMPT, sample=True)
            reply = stage.run(pb.StepRequest(step_id=1, sequences=[first], open=[opened]))
            at, last = len(PROMPT), reply.results[0].token_ids[-1]
            for i in range(args.steps):
                if mode == modes[1]:
                    other.sum()
                step = pb.SequenceStep(
                    seq_id=name,
                    keep=at,
                    token_ids=[last, DRAFT],
                    sample=True,
                    verify=1,
                    draft_tokens=1 if mode == modes[2] else 0,
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
        print(f"{mode:40s} trunk {trunk:.3f} ms, head {head:.3f} ms (medians of {len(values)})")


if __name__ == "__main__":
    main()
