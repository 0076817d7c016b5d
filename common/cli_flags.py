"""The flags of `mtpd`'s commands, by group (generation, model, client, pipeline,
serving, worker TLS), and the types that parse their values. `cli.py` wires them to the
commands."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtpd.daemon.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    flagged_options,
    parse_draft_tokens,
)

# model.quant.QUANT_MODES, written out: the parsers are built before torch loads.
QUANT_CHOICES = ["none", "int8", "int4"]
# worker.shard_loading.KV_CACHE_CHOICES, written out for the same reason.
KV_CACHE_CHOICES = ["auto", "float16", "int8"]


def flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its error message, not "invalid value"."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


draft_tokens = flag_type(parse_draft_tokens)


def _add_option_flag(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """An option's flag as the table (mtpd.daemon.options) states it; absent, it takes the
    server's default."""
    settings = dict(f.metadata["flag"])
    names = [f"--{f.name.replace('_', '-')}"]
    if short := settings.pop("short", None):
        names.insert(0, short)
    settings["help"] = settings["help"].format(default=f.default)
    if parse := settings.pop("parse", None):
        settings["type"] = flag_type(parse)
    elif "action" not in settings:
        settings["type"] = {"int": int, "int | None": int, "float": float}[f.type]
    p.add_argument(*names, default=None, **settings)


def add_generation_flags(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    """The flags of one generation: the same for `run`, `generate` and `chat`, with the
    defaults every interface shares (mtpd.daemon.options)."""
    if prompt:
        p.add_argument("prompt", help="the prompt (a user message unless --raw)")
        p.add_argument(
            "--raw", action="store_true", help="send the prompt as is, without the chat template"
        )
    for f in flagged_options():
        _add_option_flag(p, f)
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
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="none",
        help="weight-only quantization of the linear layers (GGUF Q4_0/Q4_1 weights are "
        "repacked exactly under int4)",
    )
    p.add_argument(
        "--kv-cache",
        choices=KV_CACHE_CHOICES,
        default="auto",
        help="the KV cache's element type: auto (float16 under --quant, else float32 on a "
        "CPU), float16, or int8 with a scale per 32 values (half float16's bytes; the CPU "
        "kernels only: docs/quantization.md)",
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


def add_client_flags(p: argparse.ArgumentParser) -> None:
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


def parse_bytes(text: str) -> int:
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


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
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
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with one worker, send each plain decoding step before the last one answers, "
        "hiding the daemon's turnaround (default: where the daemon has a core the step does "
        "not use: GPU or remote workers, or --threads below the cores)",
    )
    p.add_argument(
        "--max-context", type=int, default=2048, help="positions per sequence (default 2048)"
    )
    p.add_argument(
        "--cache-memory",
        type=parse_bytes,
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
    add_worker_tls_flags(p, "--worker-tls")
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


def add_serve_flags(p: argparse.ArgumentParser) -> None:
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
        type=parse_bytes,
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


def add_worker_tls_flags(p: argparse.ArgumentParser, prefix: str) -> None:
    """Mutual TLS between the daemon and remote workers: all three, or none."""
    p.add_argument(f"{prefix}-cert", default=None, help="worker plane TLS: PEM certificate")
    p.add_argument(f"{prefix}-key", default=None, help="worker plane TLS: its PEM key")
    p.add_argument(
        f"{prefix}-ca", default=None, help="worker plane TLS: the CA peers' certificates need"
    )
