"""The flags of `mtpd`'s commands, by group (generation, model, client, pipeline,
serving, worker TLS), and the types that parse their values. `cli.py` wires them to the
commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtpd.daemon.options import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS,
    MAX_DRAFT_TOKENS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    GenerationOptions,
)


def draft_tokens(text: str) -> int | None:
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


def logit_bias(text: str) -> dict[int, float]:
    try:
        bias = json.loads(text)
        return {int(k): float(v) for k, v in bias.items()}
    except (ValueError, AttributeError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object of token ids and biases"
        ) from None


def add_generation_flags(p: argparse.ArgumentParser, prompt: bool = True) -> None:
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
        type=logit_bias,
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
        type=draft_tokens,
        default=None,
        metavar="K|auto",
        help="MTP drafts per step: a number (0 turns MTP off) or auto (the default: chosen "
        "per sequence from measured acceptance and costs)",
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
