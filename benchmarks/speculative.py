"""MTP speculative decoding against plain decoding, side by side in one run.

    python benchmarks/speculative.py [--workers 1 2] [--tokens 128] [--p-min P] [--json OUT]

SmolLM2 with the shipped head, greedy, one stream: each prompt is generated with MTP
off and with the adaptive policy (order alternating), on the same pipeline. Reports
decode tokens/s and their ratio, acceptance by position, whether the outputs are
identical (the shared comparator; near-ties counted), and the speedup the cost model
predicts from this run's own measurements:

    predicted = (tokens per step / mean step time with MTP) / (1 / mean plain step time)

where the step times are the pipeline's (daemon submit to tail reply). realized /
predicted shows what the machinery between steps loses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mtpd.daemon.draft_policy import AUTO, DraftPolicy, DraftStats
from mtpd.daemon.pipeline import Pipeline, PipelineConfig
from mtpd.daemon.scheduler import Scheduler
from mtpd.model.checkpoint import open_checkpoint, read_config
from mtpd.model.compare import compare_tokens
from mtpd.model.default_model import default_head_path, resolve_model
from mtpd.model.sampling import SamplingParams
from mtpd.model.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash table works.",
    "List five fruits and their colours.",
    "Write a haiku about autumn.",
    "How do vaccines work?",
    "Give me three tips for learning a language.",
    "Describe the water cycle.",
    "Write a Python function that reverses a string.",
    "What are the main causes of the French Revolution?",
    "Write a polite email declining a meeting invitation.",
    "Summarize the plot of Romeo and Juliet.",
]


def run_one(pipeline: Pipeline, prompt: list[int], setting, tokens: int, p_min: float) -> dict:
    scheduler = Scheduler(pipeline, eos_ids=set(), policy=DraftPolicy(setting, p_min))
    request = scheduler.submit(
        prompt, SamplingParams(), tokens, ignore_eos=True, return_logits=setting == 0
    )
    stream = iter(request)
    next(stream)  # prefill and first token
    start = time.perf_counter()
    n = 1 + sum(len(step.token_ids) for step in stream)
    elapsed = time.perf_counter() - start
    result = request.result()
    steps = [s for s in scheduler.recent_steps][1:]  # decode steps only
    scheduler.close()
    return {
        "rate": (n - 1) / elapsed,
        "result": result,
        "step_s": [s.outcome.completed_at - s.outcome.submitted_at for s in steps],
        "draft_s": [s.outcome.timings[-1].draft_s for s in steps],
    }


def bench(path, cfg, prompts, workers: int, tokens: int, p_min: float) -> dict:
    pipeline = Pipeline.start(
        PipelineConfig(
            model=str(path),
            num_layers=cfg.num_layers,
            workers=workers,
            device="cpu",
            max_seqs=2,
            max_context=1024,
            load_mtp=True,
            mtp_head=str(default_head_path(None)),
        )
    )
    runs = {0: [], AUTO: []}
    with pipeline:
        run_one(pipeline, prompts[0], AUTO, 16, p_min)  # warm-up
        for i, prompt in enumerate(prompts):
            for setting in (0, AUTO) if i % 2 == 0 else (AUTO, 0):
                runs[setting].append(run_one(pipeline, prompt, setting, tokens, p_min))

    plain, spec = runs[0], runs[AUTO]
    agreements = [
        compare_tokens(p["result"].token_ids, p["result"].logits, s["result"].token_ids)
        for p, s in zip(plain, spec, strict=True)
    ]
    total = DraftStats()
    for r in spec:
        total.merge(r["result"].drafts)
    plain_rate = statistics.mean(r["rate"] for r in plain)
    spec_rate = statistics.mean(r["rate"] for r in spec)
    plain_step = statistics.mean(t for r in plain for t in r["step_s"])
    spec_step = statistics.mean(t for r in spec for t in r["step_s"])
    tokens_per_step = total.tokens_per_step
    predicted = (tokens_per_step / spec_step) * plain_step
    realized = spec_rate / plain_rate
    return {
        "workers": workers,
        "decode_tokens_per_s": {"mtp_off": round(plain_rate, 2), "mtp_auto": round(spec_rate, 2)},
        "speedup": round(realized, 3),
        "acceptance_by_position": [round(a, 4) for a in total.acceptance_by_position],
        "conditional_acceptance_by_position": [
            round(a, 4) for a in total.conditional_acceptance_by_position
        ],
        "drafts_by_position": total.drafted,
        "tokens_per_step": round(tokens_per_step, 3),
        "mean_step_ms": {
            "mtp_off": round(1000 * plain_step, 2),
            "mtp_auto": round(1000 * spec_step, 2),
        },
        "mean_draft_ms_per_step": round(
            1000 * statistics.mean(t for r in spec for t in r["draft_s"]), 2
        ),
        "predicted_speedup": round(predicted, 3),
        "realized_over_predicted": round(realized / predicted, 3),
        "outputs_identical": sum(a.equal for a in agreements),
        "near_ties": sum(a.ok and not a.equal for a in agreements),
        "diverged": sum(not a.ok for a in agreements),
        "prompts": len(prompts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS))
    ap.add_argument("--p-min", type=float, default=0.0, help="--draft-p-min for auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = resolve_model(None)
    ckpt = open_checkpoint(path)
    cfg = read_config(ckpt)
    tok = Tokenizer.from_checkpoint(ckpt, cfg)
    prompts = [
        tok.encode(tok.render_chat([{"role": "user", "content": q}]))
        for q in QUESTIONS[: args.prompts]
    ]
    out = [bench(path, cfg, prompts, w, args.tokens, args.p_min) for w in args.workers]
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
