"""The CLI commands that talk to a running daemon through the SDK: `mtpd generate`,
`mtpd chat`, `mtpd info`, `mtpd stats`. `mtpd run` shares the output format."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from mtpd.client.messages import ChatOptions, GenerationResult, Options
from mtpd.client.sync_client import Client
from mtpd.credentials import read_token_file
from mtpd.daemon.options import STRUCTURED_KINDS, flagged_options
from mtpd.v1 import inference_pb2 as api


def request_options(args: argparse.Namespace) -> Options:
    """The generation options given on the command line (absent ones: the server's)."""
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in flagged_options()}
    for kind in STRUCTURED_KINDS:  # one flag per kind
        value = getattr(args, kind)
        if value:  # "@FILE" stands for the file's text
            if isinstance(value, str) and value.startswith("@"):
                value = Path(value[1:]).read_text()
            values["structured_output"] = {kind: value}
    return Options(**{k: v for k, v in values.items() if v is not None})


def user_messages(args: argparse.Namespace, text: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": text}]


def result_json(result: GenerationResult, info: api.ModelInfo) -> dict[str, Any]:
    """The one JSON shape of a generation, for `mtpd run --json` and `mtpd generate --json`."""
    timing, drafts = result.timing, result.drafts
    policy = drafts.draft_policy
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "request_id": result.request_id,
        "model": info.model,
        "workers": len(info.workers),
        "layers_per_worker": [w.end_layer - w.first_layer for w in info.workers],
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "n_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "stop_sequence": result.stop_sequence,
        "reasoning": result.reasoning,
        "tool_calls": [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in result.tool_calls
        ],
        "logprobs": [
            {
                "token_id": e.token_id,
                "logprob": e.logprob,
                "top": dict(zip(e.top_token_ids, e.top_logprobs, strict=True)),
            }
            for e in result.logprobs
        ],
        "choices": [
            {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            for c in result.choices
        ],
        "elapsed_s": round(timing.elapsed_s, 4),
        "time_to_first_token_s": round(timing.time_to_first_token_s, 4),
        "tokens_per_s": round(timing.tokens_per_s, 2),
        "decode_tokens_per_s": round(timing.decode_tokens_per_s, 2),
        "draft_tokens": int(policy) if policy.isdigit() else policy,
        "acceptance_by_position": [round(a, 4) for a in drafts.acceptance_by_position],
        "tokens_per_step": round(drafts.tokens_per_step, 4),
        "verify_s": round(timing.verify_s, 4),
        "draft_s": round(timing.draft_s, 4),
        "transport_s": round(timing.transport_s, 4),
    }


def report(result: GenerationResult, info: api.ModelInfo, as_json: bool) -> None:
    """After the streamed text: the JSON object, or a one-line summary on stderr."""
    if as_json:
        print(json.dumps(result_json(result, info)))
    else:
        print(flush=True)
        print(summary_line(result, info), file=sys.stderr)


def summary_line(result: GenerationResult, info: api.ModelInfo) -> str:
    t = result.timing
    return (
        f"[{result.completion_tokens} tokens in {t.elapsed_s:.2f} s: {t.tokens_per_s:.1f} tok/s, "
        f"decode {t.decode_tokens_per_s:.1f} tok/s, first token {t.time_to_first_token_s:.2f} s; "
        f"{result.finish_reason}; {len(info.workers)} worker(s); "
        f"{result.drafts.tokens_per_step:.2f} tokens/step]"
    )


def _client(args: argparse.Namespace) -> Client:
    token = read_token_file(args.api_token_file) if args.api_token_file else None
    return Client(args.address, token=token, timeout=args.timeout, tls_ca=args.tls_ca)


def _print_stream(stream, echo: bool) -> GenerationResult:
    """The reply's text on stdout as it comes; reasoning on stderr; each tool call on a
    line of its own."""
    with stream:
        for delta in stream:
            if echo:
                sys.stderr.write(delta.reasoning)
                sys.stderr.flush()
                sys.stdout.write(delta.text)
                for call in delta.tool_calls:
                    sys.stdout.write(f"\n[tool call {call.id}] {call.name} {call.arguments}")
                sys.stdout.flush()
    return stream.result


def chat_options(args: argparse.Namespace) -> ChatOptions:
    """`mtpd chat`'s tools, tool choice and template keywords."""
    options = ChatOptions()
    if args.tools:
        tools = json.loads(Path(args.tools).read_text())
        if not isinstance(tools, list):
            raise SystemExit(f"mtpd chat: {args.tools}: a JSON list of tools is expected")
        options["tools"] = tools
    if args.tool_choice:
        options["tool_choice"] = args.tool_choice
    if args.chat_template_kwargs:
        options["chat_template_kwargs"] = json.loads(args.chat_template_kwargs)
    return options


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        options, info = request_options(args), client.info()
        if args.raw or not info.chat_template:  # as `mtpd run` does
            stream = client.stream(args.prompt, **options)
        else:
            stream = client.chat_stream(user_messages(args, args.prompt), **options)
        several = (args.n or 1) > 1  # their text is printed once all have ended
        result = _print_stream(stream, echo=not args.json and not several)
        if several and not args.json:
            for i, choice in enumerate(result.choices):
                print(f"[choice {i}] {choice.text}")
        report(result, info, args.json)
    return 0


def _read_line(prompt: str, interactive: bool) -> str | None:
    if interactive:
        print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    return None if not line or line.strip() in ("/exit", "/quit") else line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation on stdin: each line is a user message; the reply streams back.
    When the reply calls tools, the next lines are their results, one per call."""
    interactive = sys.stdin.isatty()
    if (args.n or 1) > 1:
        raise SystemExit("mtpd chat: one reply per turn; --n is for mtpd generate")
    with _client(args) as client:
        options = {**request_options(args), **chat_options(args)}
        info = client.info()
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": args.system}] if args.system else []
        )
        answered = True  # the last reply needs no tool results
        while True:
            if answered:
                line = _read_line("> ", interactive)
                if line is None:
                    return 0
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line})
            result = _print_stream(client.chat_stream(messages, **options), echo=not args.json)
            # The reasoning stays out of the history, as chat clients keep it.
            messages.append(
                {"role": "assistant", "content": result.text, "tool_calls": result.tool_calls}
            )
            if args.json:
                print(json.dumps(result_json(result, info)), flush=True)
            else:
                print(flush=True)
            for call in result.tool_calls:
                line = _read_line(f"{call.name} ({call.id}) returned> ", interactive)
                if line is None:
                    return 0
                messages.append({"role": "tool", "tool_call_id": call.id, "content": line})
            answered = not result.tool_calls


def message_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready values, every field present and 64-bit integers as
    numbers (protobuf's JSON mapping makes them strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            data[f.name] = dict(value)
        elif f.message_type is not None:
            if f.is_repeated:
                data[f.name] = [message_dict(v) for v in value]
            elif message.HasField(f.name):
                data[f.name] = message_dict(value)
        elif f.cpp_type in (f.CPPTYPE_INT64, f.CPPTYPE_UINT64):
            data[f.name] = list(value) if f.is_repeated else value
    return data


def _print_message(message: Message, as_json: bool) -> None:
    data = message_dict(message)
    if as_json:
        print(json.dumps(data))
        return
    for key, value in data.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_message(client.info(), args.json)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_message(client.stats(), args.json)
    return 0
