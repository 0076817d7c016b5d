"""The `mtpd` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from mtpd import __version__
from mtpd.credentials import TokenFileError, read_token_file
from mtpd.daemon.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS,
    MAX_DRAFT_TOKENS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    GenerationOptions,
)

EXIT_USAGE = 2  # bad input: model files, flags, prompts
CONFIG_HELP = (
    "a TOML file of mtpd serve's flags (default $MTPD_CONFIG, else /etc/mtpd/mtpd.toml "
    "if it exists); MTPD_<FLAG> variables override it, flags override both"
)


class UserError(Exception):
    """Reported as one line on stderr with exit code 2, no traceback."""


def _draft_tokens(text: str) -> int | None:
    """A number of drafts per step, or auto (None: the server's policy)."""
    if text == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of drafts or auto") from None
    if not 0 <= k <= MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_DRAFT_TOKENS} or auto, got {k}")
    return k


def _logit_bias(text: str) -> dict[int, float]:
    try:
        bias = json.loads(text)
        return {int(k): float(v) for k, v in bias.items()}
    except (ValueError, AttributeError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object of token ids and biases"
        ) from None


def _add_generation_flags(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    """The flags of one generation: the same for `run`, `generate` and `chat`, with the
    defaults every interface shares (mtpd.daemon.options)."""
    if prompt:
        p.add_argument("prompt", help="the prompt (a user message unless --raw)")
        p.add_argument(
            "--raw", action="store_true", help="send the prompt as is, without the chat template"
        )
    d = GenerationOptions()  # the defaults
    p.add_argument(
        "--max-tokens",
        type=int,
        help=f"tokens to generate at most (default {DEFAULT_MAX_TOKENS}, or what fits the context)",
    )
    p.add_argument("--temperature", type=float, help=f"0 means greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default {d.top_p}: off)")
    p.add_argument("--top-k", type=int, help=f"0 turns top-k off (default {d.top_k})")
    p.add_argument("--min-p", type=float, help=f"(default {d.min_p}: off)")
    p.add_argument("--repetition-penalty", type=float, help=f"(default {d.repetition_penalty})")
    p.add_argument("--seed", type=int, help=f"seed of the sampler (default {d.seed})")
    p.add_argument(
        "--presence-penalty", type=float, help=f"[-2, 2] (default {d.presence_penalty}: off)"
    )
    p.add_argument(
        "--frequency-penalty", type=float, help=f"[-2, 2] (default {d.frequency_penalty}: off)"
    )
    p.add_argument(
        "--logprobs",
        action="store_true",
        default=None,
        help="return each token's log-probability (in --json)",
    )
    p.add_argument("--top-logprobs", type=int, help="and the top N tokens' at its position (0..20)")
    p.add_argument(
        "--logit-bias",
        type=_logit_bias,
        help="token ids' biases as JSON, e.g. '{\"13\": -100}' (bans token 13)",
    )
    p.add_argument(
        "--stop",
        action="append",
        help="a stop sequence: generation ends before it (repeat for several)",
    )
    structured = p.add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema",
        metavar="SCHEMA|@FILE",
        help="the output is JSON valid against this JSON Schema (docs/structured-output.md)",
    )
    structured.add_argument(
        "--json-object", action="store_true", default=None, help="the output is a JSON object"
    )
    structured.add_argument(
        "--regex", metavar="REGEX|@FILE", help="the output matches this regular expression"
    )
    structured.add_argument(
        "--grammar", metavar="LARK|@FILE", help="the output follows this Lark grammar (llguidance)"
    )
    p.add_argument(
        "-n",
        "--n",
        type=int,
        help="choices from the prompt, choice i sampling with seed + i (default 1)",
    )
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    p.add_argument(
        "--draft-tokens",
        type=_draft_tokens,
        default=None,
        metavar="K|auto",
        help="MTP drafts per step: a number (0 turns MTP off) or auto (the default: chosen "
        "per sequence from measured acceptance and costs)",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--quant",
        choices=["none", "int8", "int4"],
        default="none",
        help="weight-only quantization of the linear layers (GGUF Q4_0/Q4_1 weights are "
        "repacked exactly under int4)",
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


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="the daemon: unix:PATH, a socket path or HOST:PORT (default $MTPD_ADDRESS, "
        "else the default socket)",
    )
    p.add_argument("--api-token-file", default=None, help="the daemon's API token")
    p.add_argument(
        "--tls-ca", default=None, help="talk TLS to a TCP address, trusting this PEM certificate"
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per call")


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
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay decode and verification steps as CUDA graphs (default: on for CUDA "
        "workers with attention layers only and unquantized weights)",
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
        "local ones (they meet here behind the token; the data plane itself, gloo or NCCL, "
        "trusts its network: private networks only)",
    )
    p.add_argument("--token-file", default=None, help="the shared worker token (--join-listen)")
    _add_worker_tls_flags(p, "--worker-tls")
    p.add_argument(
        "--step-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="a worker that leaves a step unanswered this long is restarted (default 120)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="restarts (local) or rejoins (remote) of each worker within --restart-window; "
        "past them requests fail until the window allows another (default 5)",
    )
    p.add_argument(
        "--restart-window",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="the sliding window --max-restarts counts in (default 600)",
    )
    p.add_argument(
        "--rejoin-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a failed remote worker has to join again (default 300)",
    )


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="the unix socket to listen on (default /run/mtpd/mtpd.sock when writable, else "
        "$XDG_RUNTIME_DIR/mtpd/mtpd.sock or /tmp/mtpd-$UID/mtpd.sock)",
    )
    p.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="also listen on TCP (port 0: any free port); off by default",
    )
    p.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="also serve the OpenAI-compatible HTTP API (port 0: any free port); off by default",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id of the HTTP API (default: the model file's or directory's name)",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate for --listen and --http"
    )
    p.add_argument(
        "--tls-key", type=Path, default=None, help="PEM private key for --listen and --http"
    )
    p.add_argument("--api-token-file", default=None, help="require this bearer token on every call")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for admission at most"
    )
    p.add_argument(
        "--max-request-bytes",
        type=_parse_bytes,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="SIZE",
        help="larger requests are refused (default 1M)",
    )
    p.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; "
        "with --http and without this, at /metrics on the HTTP port)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default="auto",
        help="how chat replies' tool calls are read: <tool_call>{json}</tool_call> (hermes: "
        "Hermes, Qwen2.5, Qwen3), <function=...><parameter=...> (xml: Qwen3-Coder, Qwen3.5), "
        "or as the chat template teaches (auto, default)",
    )
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep finished requests' caches for prompts that begin with their tokens (a "
        "conversation's next turn): on by default",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default="auto",
        help="auto: <think>...</think> comes back as reasoning, apart from the content, "
        "where the chat template knows it; none: as content",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, new requests are refused and running ones get this long to "
        "finish (default 30)",
    )


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line, and its `serve` command (configuration files apply to it)."""
    parser = argparse.ArgumentParser(prog="mtpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mtpd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from one prompt in this process and print stats")
    _add_generation_flags(run)
    _add_model_flags(run)
    _add_pipeline_flags(run)
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="run the daemon: load the model, serve the gRPC API")
    _add_model_flags(serve)
    serve.add_argument(
        "--draft-tokens",
        type=_draft_tokens,
        default=None,
        metavar="K|auto",
        help="the server's MTP drafts per step: a number (0 turns MTP off) or auto (default)",
    )
    _add_pipeline_flags(serve)
    _add_serve_flags(serve)
    serve.add_argument("--config", default=None, help=CONFIG_HELP)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="measure decode speed by draft length and concurrency, side by side in one run",
    )
    _add_model_flags(bench)
    _add_pipeline_flags(bench)
    from mtpd.bench.commands import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    config = sub.add_parser("config", help="the daemon's configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="print mtpd serve's effective configuration and where each value is from"
    )
    show.add_argument("--config", default=None, help=CONFIG_HELP)
    show.set_defaults(func=lambda args: _cmd_config_show(args, serve))

    generate = sub.add_parser("generate", help="generate from a running daemon, streaming")
    _add_generation_flags(generate)
    _add_client_flags(generate)
    generate.set_defaults(func=_client_command("cmd_generate"))

    chat = sub.add_parser("chat", help="chat with a running daemon (one message per line)")
    _add_generation_flags(chat, prompt=False)
    chat.add_argument(
        "--tools",
        default=None,
        metavar="FILE",
        help="a JSON list of OpenAI function tools the model may call; each call is "
        "printed, and the next lines are the calls' results",
    )
    chat.add_argument(
        "--tool-choice", default=None, help="auto (default), none, required, or a tool's name"
    )
    chat.add_argument(
        "--chat-template-kwargs",
        default=None,
        metavar="JSON",
        help="extra chat template variables, e.g. '{\"enable_thinking\": false}'",
    )
    _add_client_flags(chat)
    chat.set_defaults(func=_client_command("cmd_chat"))

    for name, what in (
        ("info", "the model, its workers and defaults"),
        ("stats", "load and speed"),
    ):
        cmd = sub.add_parser(name, help=f"a running daemon's {what}")
        _add_client_flags(cmd)
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
        cmd.set_defaults(func=_client_command(f"cmd_{name}"))

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
    _add_worker_tls_flags(worker, "--tls")
    worker.set_defaults(func=_cmd_worker)

    from mtpd.train.commands import add_parsers

    add_parsers(sub)
    return parser, serve


def _add_worker_tls_flags(p: argparse.ArgumentParser, prefix: str) -> None:
    """Mutual TLS between the daemon and remote workers: all three, or none."""
    p.add_argument(f"{prefix}-cert", default=None, help="worker plane TLS: PEM certificate")
    p.add_argument(f"{prefix}-key", default=None, help="worker plane TLS: its PEM key")
    p.add_argument(
        f"{prefix}-ca", default=None, help="worker plane TLS: the CA peers' certificates need"
    )


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _cmd_config_show(args: argparse.Namespace, serve: argparse.ArgumentParser) -> int:
    from mtpd.daemon.config import load, render

    print(render(load(serve, args.config)))
    return 0


def _client_command(name: str):
    """A command of mtpd.client.commands, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        from mtpd.client import commands

        return getattr(commands, name)(args)

    return run


def _cmd_worker(args: argparse.Namespace) -> NoReturn:
    import logging

    from mtpd.rpc import WorkerTLS
    from mtpd.worker.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = read_token_file(args.token_file) if args.token_file else None
    serve(
        args.listen,
        args.device,
        args.threads,
        args.parent_pid,
        join=args.join,
        token=token,
        model=args.model,
        advertise=args.advertise,
        tls=WorkerTLS.from_flags(args.tls_cert, args.tls_key, args.tls_ca),
    )


def _settings(args: argparse.Namespace, max_seqs: int):
    from mtpd.daemon.coordinator import Settings
    from mtpd.daemon.draft_policy import AUTO
    from mtpd.daemon.pipeline import PipelineConfig
    from mtpd.rpc import WorkerTLS

    pipeline = PipelineConfig(
        workers=args.workers,
        device=args.device,
        split=args.split,
        dtype=args.dtype,
        quant=args.quant,
        cuda_graphs=args.cuda_graphs,
        threads=args.threads,
        transport=args.transport,
        max_seqs=max_seqs,
        max_context=args.max_context,
        cache_memory=args.cache_memory,
        join_listen=args.join_listen,
        token=read_token_file(args.token_file) if args.token_file else None,
        worker_tls=WorkerTLS.from_flags(
            args.worker_tls_cert, args.worker_tls_key, args.worker_tls_ca
        ),
        mtp_head=args.mtp_head,
        step_timeout_s=args.step_timeout,
        max_restarts=args.max_restarts,
        restart_window_s=args.restart_window,
        rejoin_timeout_s=args.rejoin_timeout,
    )
    return Settings(
        model=args.model,
        pipeline=pipeline,
        draft_tokens=AUTO if args.draft_tokens is None else args.draft_tokens,
        draft_p_min=args.draft_p_min,
        # serve's alone: bench and run read no chat replies
        tool_call_parser=getattr(args, "tool_call_parser", "auto"),
        reasoning_parser=getattr(args, "reasoning_parser", "auto"),
        prefix_cache=getattr(args, "prefix_cache", False),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from mtpd.address import default_socket
    from mtpd.daemon.frontend import Limits
    from mtpd.daemon.server import ServeConfig, serve

    if args.max_seqs < 1 or args.max_queue < 0:
        raise UserError("--max-seqs must be >= 1 and --max-queue >= 0")
    settings = _settings(args, args.max_seqs)
    settings.max_queue = args.max_queue
    config = ServeConfig(
        socket=args.socket or default_socket(),
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_token=read_token_file(args.api_token_file) if args.api_token_file else None,
        limits=Limits(max_request_bytes=args.max_request_bytes),
        drain_s=args.drain_timeout,
        metrics_listen=args.metrics_listen,
        http=args.http,
        served_model_name=args.served_model_name,
    )
    return serve(settings, config)


def _cmd_bench(args: argparse.Namespace) -> int:
    from mtpd.bench.commands import run_bench

    # The head loads when any setting drafts; max_seqs fits the widest concurrency.
    args.draft_tokens = None if any(d != 0 for d in args.draft_list) else 0
    return run_bench(args, _settings(args, max_seqs=max(args.concurrency)))


def _cmd_run(args: argparse.Namespace) -> int:
    # Heavy imports here, so `mtpd --help` stays instant.
    import asyncio

    from mtpd.client.commands import report, request_options, user_messages
    from mtpd.client.messages import generation_options
    from mtpd.daemon.coordinator import Coordinator
    from mtpd.daemon.frontend import Limits, model_info

    if not args.prompt:
        raise UserError("the prompt is empty")
    if (args.n or 1) > 1:
        raise UserError("mtpd run generates one choice: --n needs mtpd serve and mtpd generate")
    options = GenerationOptions.from_proto(generation_options(request_options(args)))
    with Coordinator.start(_settings(args, max_seqs=1)) as daemon:
        for note in daemon.notes:
            print(f"mtpd: note: {note}", file=sys.stderr)
        tok = daemon.tokenizer
        if args.raw or not tok.has_chat_template:
            prompt_ids = tok.encode(args.prompt)
        else:
            prompt_ids = tok.encode_chat(user_messages(args, args.prompt))[1]
        result = asyncio.run(_generate_here(daemon, prompt_ids, options, echo=not args.json))
        info = model_info(daemon, Limits())
    report(result, info, args.json)
    return 0


async def _generate_here(daemon, prompt_ids: list[int], options, echo: bool):
    """Generate in this process, through the daemon's own request path."""
    import contextlib

    from mtpd.client.messages import GenerationResult
    from mtpd.daemon.generation import Prompt, generate

    result = GenerationResult()
    generation = generate(daemon, Prompt(prompt_ids), options, "run")
    async with contextlib.aclosing(generation) as chunks:
        async for chunk in chunks:
            result.add(chunk)
            if echo:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, serve = _build_parser()
    from mtpd.client.errors import MtpdError
    from mtpd.model.errors import InputError

    try:
        if argv[:1] == ["serve"]:
            from mtpd.daemon.config import apply

            apply(serve, _flag_value(argv, "--config"))
        args = parser.parse_args(argv)
        return args.func(args)
    except (UserError, InputError, TokenFileError) as e:
        print(f"mtpd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MtpdError as e:
        print(f"mtpd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
