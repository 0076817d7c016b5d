"""`mtpd bench`: every configuration side by side in one run, on one pipeline, so the
ratios hold on a noisy machine — decode speed by draft length and concurrency, where a
step's time goes, acceptance, memory, the cost model's prediction beside the realized
speedup, whether greedy outputs stayed identical, and peers on the same weights."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path

from mtpd.daemon.options import MAX_DRAFT_TOKENS, parse_draft_tokens
from mtpd.model.errors import InputError

# How a configuration's drafts are labelled by head: the pipeline's own, and --second-head.
HEADS = ("", "/2")

DEFAULT_PROMPTS = [
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


def _draft_list(text: str) -> list[int | str]:
    """Draft settings as mtpd run's --draft-tokens reads each (auto: "auto")."""
    out: list[int | str] = []
    for part in text.split(","):
        try:
            k = parse_draft_tokens(part.strip())
        except InputError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}: draft tokens are 0..{MAX_DRAFT_TOKENS} or auto"
            ) from None
        out.append("auto" if k is None else k)
    return list(dict.fromkeys([0, *out]))  # MTP off is always measured: the baseline


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(p) for p in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a list like 1,8") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError("concurrency must be >= 1")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None, help="a file of prompts, one per line")
    p.add_argument("--requests", type=int, default=8, help="prompts per configuration")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per request")
    p.add_argument(
        "--draft-tokens",
        dest="draft_list",
        type=_draft_list,
        default=_draft_list("1,2,3,4,auto"),
        metavar="LIST",
        help="draft settings to compare, like 0,1,3,auto (0, MTP off, is always measured)",
    )
    p.add_argument("--concurrency", type=_int_list, default=[1, 8], metavar="LIST", help="like 1,8")
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration")
    p.add_argument(
        "--force-acceptance",
        type=float,
        default=None,
        metavar="P",
        help="draft MTP off's own continuation, each draft kept with probability P: the "
        "cost of drafting and verifying at a chosen acceptance (random-weight models)",
    )
    p.add_argument(
        "--second-head",
        default=None,
        metavar="FILE",
        help="another MTP head file, loaded by a second pipeline: every configuration runs "
        "with both heads in each round (old beside new), the second's labelled /2",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        help="transformers, llama.cpp (llama-cpp-python) or llama-bench[=PATH] (llama.cpp's "
        "program), run in every round beside mtpd",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw tokens/s (matplotlib)")


def run_bench(args: argparse.Namespace, settings) -> int:
    from mtpd.bench.peers import load_peer
    from mtpd.bench.report import config_report, plot, print_report, summary
    from mtpd.bench.runner import ForcedAcceptance, memory, process_peak_bytes, run_config
    from mtpd.daemon.coordinator import Coordinator
    from mtpd.daemon.draft_policy import DraftPolicy
    from mtpd.worker.transport import DTYPES

    heads = {HEADS[0]: settings}
    if args.second_head is not None:
        if not Path(args.second_head).is_file():
            raise InputError(f"{args.second_head}: MTP head file not found")
        pipeline_cfg = dataclasses.replace(settings.pipeline, mtp_head=args.second_head)
        heads[HEADS[1]] = dataclasses.replace(settings, pipeline=pipeline_cfg)

    if args.requests < 1 or args.max_tokens < 2 or args.rounds < 1:
        raise InputError("--requests and --rounds must be >= 1, --max-tokens >= 2")
    if args.force_acceptance is not None and not 0 <= args.force_acceptance <= 1:
        raise InputError(f"--force-acceptance must be in [0, 1], got {args.force_acceptance}")
    texts = DEFAULT_PROMPTS
    if args.prompts:  # plain lines, or JSON lines (.jsonl: mtpd train-data's)
        from mtpd.train.sources import read_prompts

        path = Path(args.prompts)
        texts = read_prompts(path)
        if not texts:
            raise InputError(f"{path}: no prompts in it")
    texts = [texts[i % len(texts)] for i in range(args.requests)]
    with contextlib.ExitStack() as started:
        daemons = {h: started.enter_context(Coordinator.start(s)) for h, s in heads.items()}
        daemon = daemons[HEADS[0]]
        for head, started_daemon in daemons.items():
            for note in started_daemon.notes:
                print(f"mtpd: note{head and f' ({head})'}: {note}", file=sys.stderr)
        if len(daemons) > 1:
            if not all(
                d.scheduler.policy.enabled and d.pipeline.mtp_head for d in daemons.values()
            ):
                raise InputError("--second-head compares two heads: both pipelines need MTP on")
            if len({d.pipeline.max_seqs for d in daemons.values()}) > 1:
                print(
                    "mtpd: note: the two pipelines hold different numbers of sequences "
                    "(--max-seqs, --cache-memory): compare their higher concurrencies with care",
                    file=sys.stderr,
                )
        tok = daemon.tokenizer
        prompts = [
            tok.encode_chat([{"role": "user", "content": t}])[1]
            if tok.has_chat_template
            else tok.encode(t)
            for t in texts
        ]
        drafts = args.draft_list if daemon.scheduler.policy.enabled else [0]
        pipeline = daemon.pipeline
        for other in daemons.values():  # warm-up: first-call costs
            run_config(other.pipeline, prompts[:1], drafts[-1], 1, 8, lookahead=settings.lookahead)
        # Peers run in every round, between mtpd's configurations, so that their ratios
        # to mtpd's hold on a machine whose speed drifts over a run. They run in this
        # process, so the coordinator's peak memory is taken before they load.
        coordinator_peak = process_peak_bytes() if args.peer else None
        loaded = [
            load_peer(n, daemon.model_path, settings.pipeline.threads or 2) for n in args.peer
        ]
        peers = {peer.name: peer for peer in loaded}  # llama-bench=PATH reports as llama-bench
        peer_rates: dict[str, list[float]] = {name: [] for name in peers}
        runs: dict[tuple[str, str, int], list] = {}  # (head, drafts, concurrency)
        # What the comparator checks outputs against: MTP off with its logits, untimed.
        # The timed runs fetch no logits: 196 KB per sequence per step on the wire made
        # MTP off's steps 1.2x slower at 8 streams, and every ratio to it kinder to MTP.
        references = {
            n: run_config(
                pipeline,
                prompts,
                0,
                n,
                args.max_tokens,
                want_logits=True,
                lookahead=settings.lookahead,
            )
            for n in args.concurrency
        }
        forced = None
        if args.force_acceptance is not None:
            plain = references[max(args.concurrency)].results
            continuations = [(p, r.token_ids) for p, r in zip(prompts, plain, strict=True)]
            forced = ForcedAcceptance(continuations, daemon.cfg.vocab_size, args.force_acceptance)
        # One policy per head and draft setting for the whole run, every round and
        # concurrency, as a serving daemon keeps one: only the first requests see it
        # cold. Fresh for each run, every run measured a cold start (at acceptance 0.1
        # its first requests explored every 8-32 steps, each exploration about a step).
        policies = {
            (head, d): DraftPolicy(d, settings.draft_p_min) for head in daemons for d in drafts
        }
        for r in range(args.rounds):
            for n in args.concurrency:
                order = drafts[r % len(drafts) :] + drafts[: r % len(drafts)]
                labels = list(daemons)[r % 2 :] + list(daemons)[: r % 2]  # which head first
                for d, head in itertools.product(order, labels):
                    print(
                        f"mtpd bench: drafts {d}{head}, {n} stream(s)", file=sys.stderr, flush=True
                    )
                    run = run_config(
                        daemons[head].pipeline,
                        prompts,
                        d,
                        n,
                        args.max_tokens,
                        draft_source=forced,
                        policy=policies[head, d],
                        lookahead=settings.lookahead,
                    )
                    runs.setdefault((head, str(d), n), []).append(run)
            for name, peer in peers.items():
                print(f"mtpd bench: peer {name}", file=sys.stderr, flush=True)
                peer_rates[name] += [peer.decode_rate(p, args.max_tokens) for p in prompts]
        mem = memory(pipeline, coordinator_peak)
        workers = len(pipeline.stages)
        device = pipeline.stages[0].device
        cuda_graphs = all(stage.load.cuda_graphs for stage in pipeline.stages)
        model_name = daemon.model_path.name
        head_names = {h: d.pipeline.mtp_head for h, d in daemons.items()}
    report_quality = None  # the model against its float self, where it is not that
    if settings.pipeline.quant != "none" or settings.pipeline.kv_cache != "auto":
        from mtpd.bench.quality import quantization_quality

        report_quality = quantization_quality(
            daemon.model_path,
            settings.pipeline.quant,
            settings.pipeline.kv_cache,
            DTYPES[settings.pipeline.dtype],
            prompts,
            args.max_tokens,
        )
    peers = {
        name: {"decode_tokens_per_s": round(statistics.median(rates), 3)}
        for name, rates in peer_rates.items()
    }
    # Each head's configurations against its own pipeline's MTP off, and every output
    # against the first's reference.
    configs = [
        {
            **config_report(
                runs[(head, d, n)],
                runs[(head, "0", n)],
                references[n],
                DTYPES[settings.pipeline.dtype],
            ),
            "draft_tokens": f"{d}{head}",
        }
        for head, d, n in sorted(
            runs, key=lambda k: (k[2], HEADS.index(k[0]), list(map(str, drafts)).index(k[1]))
        )
    ]
    report = {
        "model": str(daemon.model_path),
        "model_name": model_name,
        "workers": workers,
        "device": device,
        "dtype": settings.pipeline.dtype,
        "quant": settings.pipeline.quant,
        "kv_cache": settings.pipeline.kv_cache,
        "cuda_graphs": cuda_graphs,
        "lookahead": next(iter(runs.values()))[0].lookahead,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "forced_acceptance": args.force_acceptance,
        "heads": head_names,  # what each label's pipeline drafts with
        "configs": configs,
        "memory": mem,
        "peers": peers,
    }
    if report_quality is not None:
        report["quantization"] = report_quality
    report["summary"] = summary(configs, peers)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
