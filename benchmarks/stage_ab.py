"""Versions of the CPU kernels' source through the worker's whole decode step
(`Stage.run`: the int4 default model and the shipped head, MTP off), in blocks of steps
of each version, the versions alternating block by block: per version, the median step
and its time outside the kernels' calls (the worker's Python and torch between them).

kernel_ab.py alternates step by step, which is what a kernel's own speed needs; but what
one step leaves in the caches is the next step's to start from, and only blocks of one
version measure that (a non-temporal prefetch of the weights left the kernels' time as
it was and the worker's Python between them 0.2-0.35 ms faster, session 31).

    python benchmarks/stage_ab.py /tmp/old.c model/cpu_kernels.c [--sequences 1]
                                  [--blocks 12] [--block 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from draft_pass import GREEDY, PROMPT, int4_tail_stage  # this folder's

from mtpd.model import cpu_kernels, kernel_library
from mtpd.v1 import worker_pb2 as pb

WARM_STEPS = 3  # of each block, not counted: the first steps after a switch of library


class TimedKernels:
    """The loaded library whose `mtpd_` calls add their time to `spent`."""

    def __init__(self) -> None:
        self.library = None
        self.spent = 0.0

    def __getattr__(self, name: str):
        call = getattr(self.library, name)
        if not name.startswith("mtpd_"):
            return call

        def timed(*args):
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                self.spent += time.perf_counter() - start

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--block", type=int, default=40, help="steps in a block")
    args = ap.parse_args()
    compiler = shutil.which("cc")
    runtime, isa = kernel_library.openmp_runtime(), kernel_library.cpu_isa()
    libraries = {}
    for source in args.sources:
        kernel_library.SOURCE = source
        libraries[source] = kernel_library.load(
            kernel_library.build(compiler, runtime, ["-lmvec"], isa)
        )
    kernels = TimedKernels()
    kernels.library = libraries[args.sources[0]]
    cpu_kernels.kernels = lambda: kernels
    stage = int4_tail_stage(args.sequences)
    ids = [f"s{i}" for i in range(args.sequences)]
    first = stage.run(
        pb.StepRequest(
            step_id=1,
            sequences=[
                pb.SequenceStep(seq_id=s, keep=0, token_ids=PROMPT, sample=True) for s in ids
            ],
            open=[pb.SequenceOpen(seq_id=s, sampling=GREEDY) for s in ids],
        )
    )
    held = {r.seq_id: (len(PROMPT), r.token_ids[-1]) for r in first.results}
    steps = {s: [] for s in args.sources}
    outside = {s: [] for s in args.sources}
    for b in range(args.blocks):
        for source in args.sources if b % 2 == 0 else args.sources[::-1]:
            kernels.library = libraries[source]
            for i in range(args.block):
                if max(at for at, _ in held.values()) > 400:  # contexts alike and bounded
                    held = {s: (len(PROMPT), last) for s, (_, last) in held.items()}
                step = [
                    pb.SequenceStep(seq_id=s, keep=at, token_ids=[last], sample=True)
                    for s, (at, last) in held.items()
                ]
                kernels.spent = 0.0
                start = time.perf_counter()
                reply = stage.run(pb.StepRequest(step_id=2, sequences=step))
                took = time.perf_counter() - start
                if i >= WARM_STEPS:
                    steps[source].append(took)
                    outside[source].append(took - kernels.spent)
                held = {r.seq_id: (held[r.seq_id][0] + 1, r.token_ids[-1]) for r in reply.results}
    base = statistics.median(steps[args.sources[0]])
    for source in args.sources:
        step_s = statistics.median(steps[source])
        print(
            f"{source}: step {step_s * 1e3:.3f} ms ({step_s / base:.3f}x), outside the kernels "
            f"{statistics.median(outside[source]) * 1e3:.3f} ms ({args.sequences} sequence(s))"
        )


if __name__ == "__main__":
    main()
