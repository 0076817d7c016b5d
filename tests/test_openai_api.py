"""The OpenAI-compatible HTTP API against a live `mtpd serve --http` with 2 CPU workers,
driven by the official `openai` package as its users drive it, and by raw HTTP for what
no SDK sends (malformed JSON, wrong types, a 10 MB body)."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import torch
from live_daemon import CONTEXT, LiveDaemon, held, http_request, wait_for, write_served_model
from prometheus_client.parser import text_string_to_metric_families
from reference import GREEDY, penalised_run, solo_run

from mtpd.cli import main
from mtpd.client import Client, InvalidRequest
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine

TOKEN = "http-test-token"
MODEL = "tiny-served"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = write_served_model(tmp_path_factory.mktemp("served") / "model")
    return Engine.load(model, max_context=CONTEXT)


@pytest.fixture(scope="module")
def daemon(engine, tmp_path_factory):
    live = LiveDaemon.with_http(engine.model_path, tmp_path_factory.mktemp("daemon"), MODEL, TOKEN)
    yield live
    assert live.stop() == 0, live.log.read_text()


@pytest.fixture(scope="module")
def oai(daemon):
    return openai.OpenAI(base_url=daemon.url, api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc_client(daemon):
    with Client(daemon.address, token=TOKEN, timeout=60) as c:
        yield c


def reference_text(engine, prompt_ids: list[int], n: int, params=GREEDY) -> str:
    return engine.tokenizer.decode(solo_run(engine, prompt_ids, n, params)[0])


def chat_ids(engine, messages: list[dict]) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.render_chat(messages))


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say something"},
]


def test_models_list_and_retrieve(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oai.models.retrieve("gpt-4o")


def test_chat_completion_is_the_engine_greedy_text_with_right_usage(oai, engine):
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    prompt = chat_ids(engine, MESSAGES)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reference_text(engine, prompt, 12)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12
    drafts = reply.usage.model_extra["mtpd"]
    assert drafts["steps"] >= 1 and drafts["draft_policy"] == "auto"


def test_streamed_chat_reassembles_to_the_whole_reply(oai, engine):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    whole = oai.chat.completions.create(**args)
    chunks = list(
        oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_and_its_stream(oai, engine):
    prompt = "Once upon"
    reply = oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = engine.tokenizer.encode(prompt)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == reference_text(engine, ids, 10)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 10)
    streamed = oai.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    # Token ids are a prompt too; the default length is OpenAI's 16.
    by_ids = oai.completions.create(model=MODEL, prompt=ids, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens <= 16


def test_seeded_sampling_equals_the_grpc_api_and_stops_apply(oai, grpc_client, engine):
    args = dict(max_tokens=15, temperature=0.9, top_p=0.95, seed=7)
    http = oai.completions.create(
        model=MODEL, prompt="Seeded", extra_body={"ignore_eos": True}, **args
    )
    via_grpc = grpc_client.generate("Seeded", ignore_eos=True, **args)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    expected = reference_text(engine, engine.tokenizer.encode("Seeded"), 15, params)
    assert http.choices[0].text == via_grpc.text == expected
    stop = expected[3:5]
    stopped = oai.completions.create(
        model=MODEL, prompt="Seeded", stop=[stop], extra_body={"ignore_eos": True}, **args
    )
    assert stopped.choices[0].text == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_each_equal_their_solo_run(daemon, engine):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        oai = openai.OpenAI(base_url=daemon.url, api_key=TOKEN, max_retries=0, timeout=120)
        stream = oai.completions.create(
            model=MODEL,
            prompt=f"Request {i}",
            max_tokens=8 + i,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        ids = engine.tokenizer.encode(f"Request {i}")
        assert results[i] == reference_text(engine, ids, 8 + i), i


def test_a_disconnect_mid_stream_frees_the_sequence(oai, grpc_client):
    before = grpc_client.stats().finished.get("cancelled", 0)
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=CONTEXT - 100,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert held(grpc_client.stats()) == [1, 1]
    stream.close()
    wait_for(lambda: held(grpc_client.stats()) == [0, 0])
    wait_for(lambda: grpc_client.stats().finished.get("cancelled", 0) == before + 1)


def test_a_disconnect_while_waiting_for_a_whole_reply_frees_the_sequence(daemon, grpc_client):
    before = grpc_client.stats().finished.get("cancelled", 0)
    body = {
        "model": MODEL,
        "prompt": "slow",
        "max_tokens": CONTEXT - 10,
        "ignore_eos": True,
    }
    # The client gives up and hangs up while the workers are held.
    with daemon.workers_paused(), pytest.raises(TimeoutError):
        request(daemon, "POST", "/v1/completions", body, _auth(), timeout=0.5)
    wait_for(lambda: grpc_client.stats().finished.get("cancelled", 0) == before + 1)
    wait_for(lambda: held(grpc_client.stats()) == [0, 0])


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def request(daemon, method: str, path: str, body=None, headers=None, timeout: float = 30):
    return http_request(daemon.url, method, path, body, headers, timeout)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    # (what, path, body or raw bytes, status, param, words in the message)
    ("malformed JSON", "chat/completions", b'{"model": "x", ', 400, None, "not valid JSON"),
    ("not an object", "chat/completions", [1, 2], 400, None, "JSON object"),
    ("missing messages", "chat/completions", {"model": MODEL}, 400, "messages", "required"),
    ("messages a string", "chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "list"),
    (
        "max_tokens a string",
        "chat/completions",
        {**CHAT, "max_tokens": "5"},
        400,
        "max_tokens",
        "integer",
    ),
    (
        "temperature a word",
        "chat/completions",
        {**CHAT, "temperature": "hot"},
        400,
        "temperature",
        "number",
    ),
    ("stream a number", "chat/completions", {**CHAT, "stream": 1}, 400, "stream", "boolean"),
    (
        "negative max_tokens",
        "chat/completions",
        {**CHAT, "max_tokens": -5},
        400,
        "max_tokens",
        "greater than",
    ),
    (
        "temperature too high",
        "chat/completions",
        {**CHAT, "temperature": 3},
        400,
        "temperature",
        "less than",
    ),
    (
        "unknown role",
        "chat/completions",
        {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
        "unknown role 'wizard'",
    ),
    (
        "content of a number",
        "chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
        "string",
    ),
    (
        "an image part",
        "chat/completions",
        {
            **CHAT,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        400,
        "messages[0].content[0].type",
        "'text'",
    ),
    ("n beyond the slots", "chat/completions", {**CHAT, "n": 17}, 400, "n", "at most 16"),
    ("n of 0", "chat/completions", {**CHAT, "n": 0}, 400, "n", "greater than"),
    (
        "tool_choice naming no tool",
        "chat/completions",
        {
            **CHAT,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "launch"}},
        },
        400,
        "tool_choice",
        "'launch' names no tool",
    ),
    (
        "tools for a template that shows none",
        "chat/completions",
        {**CHAT, "tools": [TOOL]},
        400,
        "tools",
        "does not show tools",
    ),
    (
        "a tool without a name",
        "chat/completions",
        {**CHAT, "tools": [{"type": "function", "function": {"description": "x"}}]},
        400,
        "tools[0].function.name",
        "required",
    ),
    (
        "a tool's malformed schema",
        "chat/completions",
        {
            **CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
        },
        400,
        "tools[0].function.parameters",
        "not a valid JSON schema",
    ),
    (
        "a tool message answering no call",
        "chat/completions",
        {
            **CHAT,
            "messages": [*CHAT["messages"], {"role": "tool", "content": "x", "tool_call_id": "c1"}],
        },
        400,
        "messages[1].tool_call_id",
        "answers no call",
    ),
    (
        "call arguments that are not JSON",
        "chat/completions",
        {
            **CHAT,
            "messages": [
                *CHAT["messages"],
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{x"},
                        }
                    ],
                },
            ],
        },
        400,
        "messages[1].tool_calls[0].function.arguments",
        "not valid JSON",
    ),
    (
        "top_logprobs over 20",
        "chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "must be in 0..20",
    ),
    (
        "top_logprobs without logprobs",
        "chat/completions",
        {**CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
        "set logprobs too",
    ),
    (
        "a penalty out of range",
        "chat/completions",
        {**CHAT, "presence_penalty": 2.5},
        400,
        "presence_penalty",
        "must be in [-2.0, 2.0]",
    ),
    (
        "a biased token outside the vocabulary",
        "chat/completions",
        {**CHAT, "logit_bias": {"98": 5}},
        400,
        "logit_bias",
        "outside the vocabulary",
    ),
    (
        "a logit_bias key that is no token id",
        "chat/completions",
        {**CHAT, "logit_bias": {"the": 5}},
        400,
        "logit_bias",
        "is not a token id",
    ),
    (
        "a bias out of range",
        "chat/completions",
        {**CHAT, "logit_bias": {"5": 101}},
        400,
        "logit_bias[5]",
        "must be in [-100.0, 100.0]",
    ),
    (
        "an unknown response_format",
        "chat/completions",
        {**CHAT, "response_format": {"type": "yaml"}},
        400,
        "response_format",
        "is not one of text, json_object, json_schema",
    ),
    (
        "a malformed schema",
        "chat/completions",
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}},
            },
        },
        400,
        "response_format",
        "required",
    ),
    (
        "a json_schema without its schema",
        "chat/completions",
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format",
        "needs a schema",
    ),
    (
        "an uncompilable grammar",
        "completions",
        {"model": MODEL, "prompt": "a", "structured_outputs": {"grammar": "start: x y"}},
        400,
        "structured_outputs",
        "unknown name",
    ),
    (
        "a regex that does not parse",
        "completions",
        {"model": MODEL, "prompt": "a", "structured_outputs": {"regex": "[a-"}},
        400,
        "structured_outputs",
        "regex parse error",
    ),
    (
        "two constraints",
        "chat/completions",
        {
            **CHAT,
            "response_format": {"type": "json_object"},
            "structured_outputs": {"regex": "a+"},
        },
        400,
        "structured_outputs",
        "not both",
    ),
    (
        "vLLM's older spelling",
        "chat/completions",
        {**CHAT, "guided_regex": "a+"},
        400,
        "guided_regex",
        "send structured_outputs",
    ),
    ("too many stops", "chat/completions", {**CHAT, "stop": ["a"] * 40}, 400, "stop", "stop"),
    ("negative seed", "chat/completions", {**CHAT, "seed": -1}, 400, "seed", "greater than"),
    (
        "unknown model",
        "chat/completions",
        {**CHAT, "model": "gpt-4o"},
        404,
        "model",
        "not served here",
    ),
    (
        "beyond the context",
        "chat/completions",
        {**CHAT, "max_tokens": 10 * CONTEXT},
        400,
        "max_tokens",
        "context",
    ),
    (
        "two prompts",
        "completions",
        {"model": MODEL, "prompt": ["a", "b"]},
        400,
        "prompt",
        "one prompt",
    ),
    ("echo", "completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "echo", "echo"),
    (
        "a 10 MB body",
        "chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "x" * (10 << 20)}]},
        413,
        None,
        "over the limit",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_openai_errors_naming_the_problem(
    daemon, path, body, status, param, words
):
    code, reply = request(
        daemon, "POST", f"/v1/{path}", body, {**_auth(), "Content-Type": "application/json"}
    )
    assert code == status, reply
    error = json.loads(reply)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"], error["message"]


def test_the_daemon_serves_on_after_bad_requests_and_auth_is_enforced(daemon, oai):
    assert oai.completions.create(model=MODEL, prompt="still", max_tokens=3).usage.completion_tokens
    wrong = openai.OpenAI(base_url=daemon.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    status, reply = request(daemon, "POST", "/v1/chat/completions", CHAT)
    assert status == 401 and json.loads(reply)["error"]["code"] == "invalid_api_key"
    assert request(daemon, "GET", "/v1/nowhere", headers=_auth())[0] == 404
    assert request(daemon, "GET", "/v1/chat/completions", headers=_auth())[0] == 405


def test_health_is_open_and_metrics_share_the_port(daemon, oai):
    status, health = request(daemon, "GET", "/health")
    assert status == 200 and json.loads(health) == {"status": "ok"}
    assert request(daemon, "GET", "/metrics")[0] == 401

    def counter(name: str, reason: str | None = None) -> float:
        text = request(daemon, "GET", "/metrics", headers=_auth())[1].decode()
        samples = {f.name: f for f in text_string_to_metric_families(text)}[name].samples
        return sum(s.value for s in samples if reason in (None, s.labels.get("reason")))

    before = [
        counter("mtpd_requests"),
        counter("mtpd_requests_rejected"),
        counter("mtpd_requests_finished", "length"),
    ]
    oai.completions.create(
        model=MODEL, prompt="counted", max_tokens=1, extra_body={"ignore_eos": True}
    )  # sampled: without ignore_eos, 1 run in ~100 drew the end of sequence
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="refused", max_tokens=1, n=99)
    # A whole reply's request finished by its length, not cancelled by its last chunk.
    after = [
        counter("mtpd_requests"),
        counter("mtpd_requests_rejected"),
        counter("mtpd_requests_finished", "length"),
    ]
    assert after == [b + 1 for b in before]


@pytest.mark.parametrize("draft_tokens", [0, 3], ids=["mtp-off", "mtp-on"])
def test_penalties_and_logit_bias_follow_their_formulas(oai, grpc_client, engine, draft_tokens):
    """Greedy under OpenAI's formulas (tests/reference.py, on the engine's logits): the
    same tokens through gRPC and the same text through the HTTP API, drafting or not."""
    prompt = chat_ids(engine, MESSAGES)
    plain = solo_run(engine, prompt, 24)[0]
    bias = {plain[0]: -100.0, plain[3]: -100.0, 40: 3.5}  # ban two of plain's tokens
    want = penalised_run(engine, prompt, 24, bias, 0.8, 0.6)
    assert want != plain and plain[0] not in want
    sampling = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "logit_bias": bias}
    got = grpc_client.chat(
        MESSAGES, max_tokens=24, ignore_eos=True, draft_tokens=draft_tokens, **sampling
    )
    assert got.token_ids == want
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        presence_penalty=0.8,
        frequency_penalty=0.6,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True, "draft_tokens": draft_tokens},
    )
    assert reply.choices[0].message.content == engine.tokenizer.decode(want)


def test_logprobs_are_the_engines_log_softmax(oai, grpc_client, engine):
    """Each token's log-probability and its position's top 3, against the engine's
    logits, through the chat (whole and streamed) and completions APIs and gRPC, with
    MTP drafting (the rows verification reads)."""
    prompt = chat_ids(engine, MESSAGES)
    tokens, logits = solo_run(engine, prompt, 8)
    want = [torch.log_softmax(row.float(), -1) for row in logits]

    def text(ids: list[int]) -> str:  # a token as logprobs show it: its bytes' text
        return b"".join(map(engine.tokenizer.token_bytes, ids)).decode(errors="replace")

    def check(entries, top_key):
        assert len(entries) == len(tokens)
        for (token_id, logprob, top), token, row in zip(entries, tokens, want, strict=True):
            assert token_id == token and abs(logprob - float(row[token])) < 1e-4
            best = row.topk(3)
            assert [t for t, _ in top] == [top_key(i) for i in best.indices.tolist()]
            assert all(
                abs(lp - float(v)) < 1e-4 for (_, lp), v in zip(top, best.values, strict=True)
            )

    def chat_entries(content):
        ids = {text([t]): t for t in range(engine.cfg.vocab_size)}  # the char model: 1:1
        return [
            (ids[e.token], e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
            for e in content
        ]

    options = {"model": MODEL, "max_tokens": 8, "temperature": 0, "logprobs": True}
    extra = {"extra_body": {"ignore_eos": True, "draft_tokens": 3}}
    reply = oai.chat.completions.create(messages=MESSAGES, top_logprobs=3, **options, **extra)
    check(chat_entries(reply.choices[0].logprobs.content), lambda i: text([i]))
    streamed = [
        e
        for chunk in oai.chat.completions.create(
            messages=MESSAGES, top_logprobs=3, stream=True, **options, **extra
        )
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    check(chat_entries(streamed), lambda i: text([i]))

    options["logprobs"] = 3  # the completions API's: the top count
    completion = oai.completions.create(prompt=prompt, **options, **extra).choices[0].logprobs
    assert completion.tokens == [text([t]) for t in tokens]
    check(
        [
            (t, lp, list(top.items()))
            for t, lp, top in zip(
                tokens, completion.token_logprobs, completion.top_logprobs, strict=True
            )
        ],
        lambda i: text([i]),
    )

    got = grpc_client.chat(
        MESSAGES, max_tokens=8, ignore_eos=True, draft_tokens=3, logprobs=True, top_logprobs=3
    )
    check(
        [
            (e.token_id, e.logprob, list(zip(e.top_token_ids, e.top_logprobs, strict=True)))
            for e in got.logprobs
        ],
        lambda i: i,
    )


def test_n_choices_draw_with_seed_plus_their_index(oai):
    """Choice i of n is the request alone with seed + i, whole and streamed, in one
    batch; usage counts the prompt once and every choice's tokens."""
    ask = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0}
    ask["extra_body"] = {"ignore_eos": True}
    reply = oai.chat.completions.create(n=3, seed=7, **ask)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [oai.chat.completions.create(seed=7 + i, **ask) for i in range(3)]
    texts = [c.message.content for c in reply.choices]
    assert texts == [a.choices[0].message.content for a in alone]
    assert len(set(texts)) > 1  # the seeds differ, so (almost surely) do the texts
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == 30

    streamed = ["", "", ""]
    finished = set()
    for chunk in oai.chat.completions.create(n=3, seed=7, stream=True, **ask):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_n_choices_over_grpc_and_the_cli_are_their_seeds_alone(
    daemon, grpc_client, capsys, tmp_path
):
    ask = {"max_tokens": 10, "temperature": 1.0, "ignore_eos": True}
    together = grpc_client.chat(MESSAGES, n=3, seed=11, **ask)
    alone = [grpc_client.chat(MESSAGES, seed=11 + i, **ask) for i in range(3)]
    assert [c.token_ids for c in together.choices] == [a.token_ids for a in alone]
    assert [c.text for c in together.choices] == [a.text for a in alone]
    assert all(c.finish_reason == "length" for c in together.choices)
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    with grpc_client.stream("Say", n=3, seed=5, **ask) as stream:
        for delta in stream:
            streamed[delta.choice] += delta.token_ids
    assert [streamed[i] for i in range(3)] == [c.token_ids for c in stream.result.choices]
    assert (
        stream.result.choices[2].token_ids == grpc_client.generate("Say", seed=7, **ask).token_ids
    )
    with pytest.raises(InvalidRequest, match="n: at most"):
        grpc_client.generate("Say", n=100, **ask)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    argv = ["generate", "--address", daemon.address, "--api-token-file", str(token_file)]
    argv += ["--raw", "--max-tokens", "10", "--temperature", "1", "--seed", "5", "-n", "3"]
    assert main([*argv, "--json", "Say"]) == 0
    choices = json.loads(capsys.readouterr().out)["choices"]
    assert [c["token_ids"] for c in choices] == [c.token_ids for c in stream.result.choices]


def test_n_choices_refused_together_leave_nothing_running(oai, grpc_client):
    """A refusal of any choice (here: beyond the context) is the request's 400, and no
    choice keeps running."""
    for _ in range(5):  # the choices race to their refusal
        with pytest.raises(openai.BadRequestError, match="exceeds the context"):
            oai.chat.completions.create(
                model=MODEL, messages=MESSAGES, n=4, max_tokens=CONTEXT, temperature=0
            )
    assert wait_for(lambda: grpc_client.stats().running == 0)


def test_a_conversation_s_next_turn_reuses_its_cache_and_replies_alike(oai, engine, daemon):
    """Prefix caching (on by default): the second turn's prompt begins with the first
    turn's prompt and reply, whose cache it takes over; its reply is the engine's."""
    ask = {"model": MODEL, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    turn = [{"role": "user", "content": "Count with me: one, two"}]
    first = oai.chat.completions.create(messages=turn, **ask)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history = [
        *turn,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = oai.chat.completions.create(messages=history, **ask)
    prompt = chat_ids(engine, turn)
    assert second.usage.prompt_tokens_details.cached_tokens >= len(prompt)
    assert second.choices[0].message.content == reference_text(
        engine, chat_ids(engine, history), 12
    )
    status, body = request(daemon, "GET", "/metrics", None, _auth())
    assert status == 200 and b"mtpd_prompt_tokens_cached_total" in body


def test_hundreds_of_slow_connections_hold_neither_health_nor_generations(daemon, oai):
    """Twice the old limit_concurrency (max-seqs + max-queue + 32) of connections that
    send half a request line and stop: /health and a generation still answer at once,
    and the slow ones are dropped at the header deadline."""
    import resource
    import socket
    import time
    from urllib.parse import urlsplit

    from mtpd.daemon.server import HEADER_TIMEOUT_S

    url = urlsplit(daemon.url)
    count = 2 * (16 + 256 + 32)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * count)), hard))
    slow = []
    try:
        for _ in range(count):
            conn = socket.create_connection((url.hostname, url.port), timeout=5)
            conn.sendall(b"GET /v1/mod")
            slow.append(conn)
        start = time.monotonic()
        assert request(daemon, "GET", "/health")[0] == 200
        reply = oai.completions.create(model=MODEL, prompt="a", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length"
        assert time.monotonic() - start < 2
        time.sleep(HEADER_TIMEOUT_S + 1)
        for conn in slow[:: count // 8]:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # dropped
    finally:
        for conn in slow:
            conn.close()
