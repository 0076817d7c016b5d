"""The `mtpd` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from mtpd import __version__
from mtpd.cli_flags import (
    add_client_flags,
    add_generation_flags,
    add_model_flags,
    add_pipeline_flags,
    add_serve_flags,
    add_worker_tls_flags,
    draft_tokens,
)
from mtpd.credentials import TokenFileError, read_token_file
from mtpd.daemon.options import (
    GenerationOptions,
)

EXIT_USAGE = 2  # bad input: model files, flags, prompts
CONFIG_HELP = (
    "a TOML file of mtpd serve's flags (default $MTPD_CONFIG, else /etc/mtpd/mtpd.toml "
    "if it exists); MTPD_<FLAG> variables override it, flags override both"
)


class UserError(Exception):
    """Reported as one line on stderr with exit code 2, no traceback."""


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line, and its `serve` command (configuration files apply to it)."""
    parser = argparse.ArgumentParser(prog="mtpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mtpd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate from one prompt in this process and print stats")
    add_generation_flags(run)
    add_model_flags(run)
    add_pipeline_flags(run)
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="run the daemon: load the model, serve the gRPC API")
    add_model_flags(serve)
    serve.add_argument(
        "--draft-tokens",
        type=draft_tokens,
        default=None,
        metavar="K|auto",
        help="the server's MTP drafts per step: a number (0 turns MTP off) or auto (default)",
    )
    add_pipeline_flags(serve)
    add_serve_flags(serve)
    serve.add_argument("--config", default=None, help=CONFIG_HELP)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="measure decode speed by draft length and concurrency, side by side in one run",
    )
    add_model_flags(bench)
    add_pipeline_flags(bench)
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
    add_generation_flags(generate)
    add_client_flags(generate)
    generate.set_defaults(func=_client_command("cmd_generate"))

    chat = sub.add_parser("chat", help="chat with a running daemon (one message per line)")
    add_generation_flags(chat, prompt=False)
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
    add_client_flags(chat)
    chat.set_defaults(func=_client_command("cmd_chat"))

    for name, what in (
        ("info", "the model, its workers and defaults"),
        ("stats", "load and speed"),
    ):
        cmd = sub.add_parser(name, help=f"a running daemon's {what}")
        add_client_flags(cmd)
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
    worker.add_argument(
        "--step-socket",
        default=None,
        metavar="PATH",
        help="also serve the step stream on this unix socket (the daemon's own workers)",
    )
    add_worker_tls_flags(worker, "--tls")
    worker.set_defaults(func=_cmd_worker)

    from mtpd.train.commands import add_parsers

    add_parsers(sub)
    return parser, serve


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
        step_socket_path=args.step_socket,
    )


def _settings(args: argparse.Namespace, max_seqs: int):
    from mtpd.daemon.coordinator import Settings
    from mtpd.daemon.draft_policy import AUTO
    from mtpd.daemon.pipeline import PipelineConfig
    from mtpd.rpc import WorkerTLS

    if args.kv_cache != "auto" and (args.dtype != "float32" or args.device == "cuda"):
        # What the workers would refuse at load, said before any starts (they also refuse
        # a model whose layers the CPU kernels do not all run).
        raise UserError(
            f"--kv-cache {args.kv_cache} needs the CPU kernels: a CPU device and --dtype float32"
        )
    pipeline = PipelineConfig(
        workers=args.workers,
        device=args.device,
        split=args.split,
        dtype=args.dtype,
        quant=args.quant,
        kv_cache=args.kv_cache,
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
        lookahead=args.lookahead,
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
    from mtpd.daemon.frontend import Frontend
    from mtpd.daemon.generation import Prompt

    result = GenerationResult()
    generation = Frontend.around(daemon).generate_here(Prompt(prompt_ids), options)
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
    from mtpd.daemon.worker_link import WorkerError
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
    except (MtpdError, WorkerError) as e:  # WorkerError: a worker that failed to load
        print(f"mtpd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
