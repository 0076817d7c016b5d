"""The `mtpd` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mtpd import __version__

EXIT_USAGE = 2  # bad input: model files, flags, prompts


class UserError(Exception):
    """Reported as one line on stderr with exit code 2, no traceback."""


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (a user message unless --raw)")
    p.add_argument(
        "--model",
        default=None,
        help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 turns top-k off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--draft-tokens",
        default="auto",
        help="MTP drafts per step: a number (0 turns MTP off) or auto (the default: chosen "
        "per sequence from measured acceptance and costs)",
    )
    p.add_argument(
        "--draft-p-min",
        type=float,
        default=0.0,
        help="stop drafting at a draft the MTP head gives less than this probability",
    )
    p.add_argument(
        "--mtp-head",
        default=None,
        help="MTP head file (default: the shipped one for the default model, else the "
        "checkpoint's own MTP layer)",
    )


def _parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgtBb"), text[len(text.rstrip("KMGTkmgtBb")) :]
    unit = unit.upper().removesuffix("B")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 4G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return int(value)


def _add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per visible GPU, one without GPUs)",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when visible"
    )
    p.add_argument(
        "--split",
        default=None,
        help="layers per worker: even by default, 'auto' by free memory, or counts like 10,20",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per worker (default: the cores shared out between workers)",
    )
    p.add_argument(
        "--transport",
        choices=["dist", "grpc"],
        default="dist",
        help="activations between workers: torch.distributed (default) or relayed over gRPC",
    )
    p.add_argument(
        "--max-context", type=int, default=2048, help="positions per sequence (default 2048)"
    )
    p.add_argument(
        "--cache-memory",
        type=_parse_bytes,
        default=0,
        metavar="SIZE",
        help="KV cache cap per worker, like 512M or 4G (default: half the free memory)",
    )
    p.add_argument(
        "--join-listen",
        default=None,
        metavar="HOST:PORT",
        help="await --workers remote workers (`mtpd worker --join`) here instead of starting "
        "local ones; private networks only: the data-plane rendezvous is unauthenticated",
    )
    p.add_argument("--token-file", default=None, help="the shared worker token (--join-listen)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mtpd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from one prompt in this process and print stats")
    _add_generation_flags(run)
    _add_pipeline_flags(run)
    run.set_defaults(func=_cmd_run)

    worker = sub.add_parser("worker", help="serve one pipeline stage (started by the daemon)")
    worker.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT")
    worker.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    worker.add_argument("--threads", type=int, default=None, help="CPU threads")
    worker.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is gone"
    )
    worker.add_argument(
        "--join", default=None, metavar="HOST:PORT", help="join a daemon as a remote worker"
    )
    worker.add_argument("--token-file", default=None, help="the shared worker token (--join)")
    worker.add_argument("--model", default=None, help="this host's copy of the model (--join)")
    worker.add_argument(
        "--advertise", default=None, help="address the daemon reaches us at (default --listen)"
    )
    worker.set_defaults(func=_cmd_worker)

    from mtpd.train.commands import add_parsers

    add_parsers(sub)
    return parser


def _cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from mtpd.rpc import read_token_file
    from mtpd.worker.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = read_token_file(args.token_file) if args.token_file else None
    return serve(
        args.listen,
        args.device,
        args.threads,
        args.parent_pid,
        join=args.join,
        token=token,
        model=args.model,
        advertise=args.advertise,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    # Heavy imports here, so `mtpd --help` stays instant.
    from mtpd.daemon.coordinator import Coordinator, Settings
    from mtpd.daemon.draft_policy import parse_draft_tokens
    from mtpd.model.sampling import SamplingParams
    from mtpd.model.tokenizer import IncrementalDecoder
    from mtpd.rpc import read_token_file

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.prompt:
        raise UserError("the prompt is empty")
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    settings = Settings(
        model=args.model,
        workers=args.workers,
        device=args.device,
        split=args.split,
        dtype=args.dtype,
        threads=args.threads,
        transport=args.transport,
        max_seqs=1,
        max_context=args.max_context,
        cache_memory=args.cache_memory,
        join_listen=args.join_listen,
        token=read_token_file(args.token_file) if args.token_file else None,
        draft_tokens=parse_draft_tokens(args.draft_tokens),
        draft_p_min=args.draft_p_min,
        mtp_head=Path(args.mtp_head) if args.mtp_head else None,
    )
    with Coordinator.start(settings) as daemon:
        for note in daemon.notes:
            print(f"mtpd: note: {note}", file=sys.stderr)
        tok = daemon.tokenizer
        if args.raw or not tok.has_chat_template:
            text = args.prompt
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            text = tok.render_chat([*messages, {"role": "user", "content": args.prompt}])
        prompt_ids = tok.encode(text)

        decoder = IncrementalDecoder(tok)
        start = time.perf_counter()
        first_token_at = None
        request = daemon.scheduler.submit(prompt_ids, params, args.max_tokens)
        for token in request:
            first_token_at = first_token_at or time.perf_counter()
            delta = decoder.push([token])
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
        elapsed = time.perf_counter() - start
        result = request.result()
        stages = [(s.first_layer, s.end_layer) for s in daemon.pipeline.stages]

    n = len(result.token_ids)
    decode_s = elapsed - ((first_token_at or start + elapsed) - start)
    stats = {
        "model": str(daemon.model_path),
        "workers": len(stages),
        "layers_per_worker": [end - first for first, end in stages],
        "prompt_tokens": len(prompt_ids),
        "n_tokens": n,
        "finish_reason": result.finish_reason,
        "elapsed_s": round(elapsed, 4),
        "time_to_first_token_s": round((first_token_at or start) - start, 4),
        "tokens_per_s": round(n / elapsed, 2) if elapsed > 0 else 0.0,
        "decode_tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
        "draft_tokens": settings.draft_tokens if daemon.scheduler.policy.enabled else 0,
        "acceptance_by_position": [round(a, 4) for a in result.drafts.acceptance_by_position],
        "tokens_per_step": round(result.drafts.tokens_per_step, 4),
        "verify_s": round(result.drafts.verify_s, 4),
        "draft_s": round(result.drafts.draft_s, 4),
        "transport_s": round(result.drafts.transport_s, 4),
    }
    if args.json:
        print(json.dumps({"text": decoder.text(), "token_ids": result.token_ids, **stats}))
    else:
        print(flush=True)
        print(
            f"[{n} tokens in {stats['elapsed_s']:.2f} s: {stats['tokens_per_s']:.1f} tok/s, "
            f"decode {stats['decode_tokens_per_s']:.1f} tok/s, "
            f"first token {stats['time_to_first_token_s']:.2f} s; {stats['finish_reason']}; "
            f"{len(stages)} worker(s)]",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from mtpd.model.errors import InputError

    try:
        return args.func(args)
    except (UserError, InputError) as e:
        print(f"mtpd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
