"""What a step's drafting costs the tail worker, the MTP head's pass as one kernel call
(`MTPHead.forward_and_draft` on the kernels) against its calls one by one, alternated
step by step in one process: `Stage.run` on the int4 default model, one sequence
decoding greedily with k drafts a step, as `mtpd bench` at one stream runs it.

    python benchmarks/draft_pass.py [--drafts 1,2] [--steps 300]

Written for issue 24 (docs/speculative-decoding.md, session 25). Run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import torch

from mtpd.model.default_model import default_head_path
from mtpd.model.mtp import MTPHead
from mtpd.train.engine import Engine
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.stage import Stage

PROMPT = list(range(10, 90))
GREEDY = pb.SamplingParams(temperature=0, top_p=1, repetition_penalty=1)


def int4_tail_stage(max_seqs: int) -> Stage:
    """The int4 default model with the shipped head as one stage (first and tail) in this
    process, on two threads: `max_seqs` sequences of up to 512 positions. (Also
    head_eviction.py's and step_overhead.py's.)"""
    torch.set_num_threads(2)
    engine = Engine.load(
        None, quant="int4", mtp_head=default_head_path(None), max_seqs=max_seqs, max_context=512
    )
    return Stage(engine.shard, engine.shard.new_cache(max_seqs, 512), 0, 1, None, engine.mtp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafts", default="1,2")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    stage = int4_tail_stage(2)
    for k in (int(x) for x in args.drafts.split(",")):
        stage.reset(None)
        held = {}  # way: (position, last token, drafts)
        times: dict[str, dict[str, list[float]]] = {}
        for way in ("one call", "op by op"):
            opened = [pb.SequenceOpen(seq_id=way, sampling=GREEDY)]
            first = [pb.SequenceStep(seq_id=way, keep=0, token_ids=PROMPT, sample=True)]
            r = stage.run(pb.StepRequest(step_id=1, sequences=first, open=opened)).results[0]
            held[way] = (len(PROMPT), r.token_ids[-1], [])
            times[way] = {"step": [], "draft": [], "first pass": []}
        for i in range(args.steps):
            for way in ("one call", "op by op") if i % 2 else ("op by op", "one call"):
                at, last, drafts = held[way]
                if at > 400:  # back to the prompt: contexts stay alike and bounded
                    at, drafts = len(PROMPT), []
                step = pb.SequenceStep(
                    seq_id=way,
                    keep=at,
                    token_ids=[last, *drafts],
                    sample=True,
                    verify=len(drafts),
                    draft_tokens=k,
                )
                with (
                    mock.patch.object(
                        MTPHead,
                        "_pass_on_kernel",
                        side_effect=lambda *a: None,
                        autospec=True,
                    )
                    if way == "op by op"
                    else contextlib.nullcontext()
                ):
                    reply = stage.run(pb.StepRequest(step_id=2 + i, sequences=[step]))
                r = reply.results[0]
                held[way] = (at + 1 + r.accepted, r.token_ids[-1], list(r.draft_token_ids))
                t = times[way]
                t["step"].append(reply.timings.compute_s)
                t["draft"].append(reply.timings.draft_s)
                t["first pass"].append(reply.timings.draft_first_s)
        one, per_op = times["one call"], times["op by op"]
        line = ", ".join(
            f"{part} {1e3 * statistics.median(one[part]):.3f} ms against "
            f"{1e3 * statistics.median(per_op[part]):.3f}"
            for part in ("step", "draft", "first pass")
        )
        print(f"k = {k}, one call against op by op (medians of {args.steps}): {line}")


if __name__ == "__main__":
    main()
