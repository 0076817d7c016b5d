"""The public interface against a live `mtpd serve` with 2 CPU workers: the gRPC API
through the Python SDK, the CLI on top of it, and every kind of bad request."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_daemon import (
    CONTEXT,
    OTHER_UID,
    LiveDaemon,
    held,
    nothing_connected,
    planted_socket,
    self_signed_certificate,
    wait_for,
    write_served_model,
)
from prometheus_client.parser import text_string_to_metric_families
from reference import GREEDY, solo_run

from mtpd.cli import main
from mtpd.client import (
    AsyncClient,
    Cancelled,
    Client,
    InvalidRequest,
    Overloaded,
    Timeout,
    Unauthenticated,
    Unavailable,
)
from mtpd.model.sampling_params import SamplingParams
from mtpd.train.engine import Engine
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import inference_pb2_grpc as api_grpc

TOKEN = "s3cret-test-token"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_served_model(tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def engine(model):
    return Engine.load(model, max_context=CONTEXT)


@pytest.fixture(scope="module")
def daemon(model, tmp_path_factory):
    live = LiveDaemon(model, tmp_path_factory.mktemp("daemon"), token=TOKEN)
    yield live
    assert live.stop() == 0, live.log.read_text()


@pytest.fixture(scope="module")
def client(daemon):
    with Client(daemon.address, token=TOKEN, timeout=120) as c:
        yield c


def reference(engine, text: str, n: int, params: SamplingParams = GREEDY) -> list[int]:
    return solo_run(engine, engine.tokenizer.encode(text), n, params)[0]


def test_health_turns_serving_only_once_the_model_is_loaded(daemon):
    assert daemon.health_seen[0] == "NOT_SERVING"
    assert daemon.health_seen[-1] == "SERVING"


def test_stream_gives_the_single_process_tokens_and_utf8_whole_text(client, engine):
    prompt = "Once upon a time"
    stream = client.stream(prompt, max_tokens=24, ignore_eos=True, draft_tokens=2)
    deltas = list(stream)
    result = stream.result
    assert result.token_ids == reference(engine, prompt, 24)
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert "".join(d.text for d in deltas) == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids)
    assert all(0 <= d.accepted_drafts <= len(d.token_ids) for d in deltas)
    assert result.accepted_drafts == sum(d.accepted_drafts for d in deltas)
    assert (result.finish_reason, result.completion_tokens) == ("length", 24)
    assert result.prompt_tokens == len(prompt)
    assert result.drafts.draft_policy == "2" and result.drafts.steps == 23
    assert result.timing.elapsed_s >= result.timing.time_to_first_token_s > 0


def test_chat_renders_the_model_template_server_side(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = "<system>Be brief.</s><user>Hi</s><assistant>"
    ids = client.tokenize(messages=messages)
    assert client.tokenize(rendered) == ids
    chat = client.chat(messages, max_tokens=12, ignore_eos=True)
    raw = client.generate(ids, max_tokens=12, ignore_eos=True)
    assert chat.token_ids == raw.token_ids and chat.prompt_tokens == len(ids)


def test_tokenize_and_model_info(client, model):
    assert client.tokenize("abc") == [ord(c) - 32 + 3 for c in "abc"]
    info = client.info()
    assert info.model == str(model) and info.context_length == CONTEXT
    assert [(w.first_layer, w.end_layer) for w in info.workers] == [(0, 2), (2, 4)]
    assert all(w.device == "cpu" and w.pid > 0 for w in info.workers)
    assert info.mtp_head and info.draft_policy == "auto" and info.chat_template
    assert info.defaults.max_tokens == 128 and info.defaults.HasField("temperature")
    assert not info.defaults.HasField("draft_tokens")


def test_stop_sequences_end_the_text_exactly(client, engine):
    full = engine.tokenizer.decode(reference(engine, "The", 40))
    stop = full[10:13]
    cut = full.index(stop)
    result = client.generate("The", max_tokens=40, ignore_eos=True, stop=["zzzz", stop])
    assert result.text == full[:cut]
    assert (result.finish_reason, result.stop_sequence) == ("stop", stop)
    # The character tokenizer makes tokens characters: counted up to the stop's end.
    assert result.completion_tokens == len(result.token_ids) == cut + len(stop)
    assert client.generate("The", max_tokens=40, ignore_eos=True, stop=stop).text == full[:cut]


def test_cancelling_a_stream_frees_its_cache_on_every_worker(client):
    stream = client.stream("Cancel me", max_tokens=200, ignore_eos=True)
    deltas = iter(stream)
    next(deltas)
    stats = client.stats()
    assert stats.running == 1 and held(stats) == [1, 1]
    before = stats.finished.get("cancelled", 0)
    stream.cancel()
    wait_for(lambda: held(client.stats()) == [0, 0])
    stats = wait_for(lambda: (s := client.stats()).finished.get("cancelled", 0) > before and s)
    assert stats.running == 0


def test_a_passed_deadline_ends_the_request_and_frees_its_cache(daemon, client):
    before = client.stats().finished.get("cancelled", 0)
    with daemon.workers_paused(), pytest.raises(Timeout):  # held past the deadline
        client.generate("Too slow", max_tokens=220, ignore_eos=True, timeout=0.5)
    # Ended as cancelled, not run to its length, and its cache freed on every worker.
    wait_for(lambda: client.stats().finished.get("cancelled", 0) == before + 1)
    wait_for(lambda: held(client.stats()) == [0, 0])


def test_sixteen_concurrent_streams_each_equal_their_solo_run(client, engine):
    cases = [
        (f"Prompt number {i}:", SamplingParams(temperature=0.9, seed=i) if i % 2 else None)
        for i in range(16)
    ]
    results: list = [None] * len(cases)

    def run(i: int) -> None:
        prompt, params = cases[i]
        sampling = {"temperature": params.temperature, "seed": params.seed} if params else {}
        results[i] = client.generate(prompt, max_tokens=20, ignore_eos=True, **sampling)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (prompt, params), result in zip(cases, results, strict=True):
        assert result.token_ids == reference(engine, prompt, 20, params or GREEDY)


def test_async_client_streams_the_same_tokens(daemon, client):
    want = client.generate("Async", max_tokens=10, ignore_eos=True)

    async def go():
        async with AsyncClient(daemon.address, token=TOKEN) as aclient:
            stream = aclient.stream("Async", max_tokens=10, ignore_eos=True)
            texts = [d.text async for d in stream]
            chat = await aclient.chat([("user", "Hi")], max_tokens=3, ignore_eos=True)
            long = aclient.stream("Cancel", max_tokens=200, ignore_eos=True)
            deltas = aiter(long)
            await anext(deltas)
            long.cancel()
            with pytest.raises(Cancelled):
                async for _ in deltas:
                    pass
            return stream.result, texts, chat, await aclient.info()

    result, texts, chat, info = asyncio.run(go())
    assert result.token_ids == want.token_ids and "".join(texts) == want.text
    assert chat.completion_tokens == 3 and info.num_layers == 4


def test_one_request_id_from_the_api_to_the_workers(daemon, client, engine):
    """The daemon's id (req-N) names a request in the log and is its sequence on the
    workers; a caller's own request_id comes back in every chunk. Two callers sending the
    same id at once are two requests, each answered alone."""
    want = reference(engine, "Same id", 12)
    with ThreadPoolExecutor(2) as pool:
        twins = list(
            pool.map(
                lambda _: client.generate("Same id", max_tokens=12, request_id="same"), range(2)
            )
        )
    assert [r.request_id for r in twins] == ["same", "same"]
    assert all(r.token_ids == want for r in twins)
    plain = client.generate("No id", max_tokens=2)
    assert re.fullmatch(r"req-\d+", plain.request_id)
    # The end is logged as the call closes, which may be just after the last chunk.
    wait_for(lambda: f"{plain.request_id}: length" in daemon.log.read_text())
    log = daemon.log.read_text()
    owns = set(re.findall(r"(req-\d+) \('same'\): \d+ prompt tokens", log))
    assert len(owns) == 2 and all(f"{own} ('same'): length" in log for own in owns)


BAD_REQUESTS = [
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt beyond the context", {"prompt": "x" * (CONTEXT + 1)}, "context"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens beyond the context", {"max_tokens": CONTEXT}, "max_tokens"),
    ("negative temperature", {"temperature": -0.5}, "temperature"),
    ("NaN temperature", {"temperature": math.nan}, "temperature"),
    ("top_p 0", {"top_p": 0.0}, "top_p"),
    ("top_p above 1", {"top_p": 1.5}, "top_p"),
    ("negative top_k", {"top_k": -1}, "top_k"),
    ("draft_tokens above 16", {"draft_tokens": 17}, "draft_tokens"),
    ("thousands of stop sequences", {"stop": [f"s{i}" for i in range(5000)]}, "stop"),
    ("a token id outside the vocabulary", {"prompt": [5, 98]}, "prompt_token_ids"),
    ("a 10 MB prompt", {"prompt": "y" * (10 << 20)}, "limit"),
    ("a long request id", {"request_id": "r" * 129}, "request_id"),
]


@pytest.mark.parametrize(
    ("case", "fields", "named"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_are_refused_naming_the_field(client, case, fields, named):
    fields = {"prompt": "Hello", "max_tokens": 4, **fields}
    with pytest.raises(InvalidRequest) as refused:
        client.generate(fields.pop("prompt"), **fields)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert named in str(refused.value)


def test_bad_chat_messages_are_refused_naming_the_field(client):
    with pytest.raises(InvalidRequest, match=r"messages\[1\]\.role.*'robot'"):
        client.chat([("user", "Hi"), ("robot", "beep")])
    with pytest.raises(InvalidRequest, match="messages"):
        client.chat([])


def test_reflection_lists_the_services(daemon):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.intercept_channel(grpc.insecure_channel(daemon.address), _with_token(TOKEN))
    with channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"mtpd.v1.Inference", "grpc.health.v1.Health"} <= set(services)


def _with_token(token: str) -> grpc.StreamStreamClientInterceptor:
    class Add(grpc.StreamStreamClientInterceptor):
        def intercept_stream_stream(self, continuation, details, requests):
            metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
            return continuation(details._replace(metadata=metadata), requests)

    return Add()


def test_a_wrong_token_is_unauthenticated_but_health_stays_open(daemon):
    for token in ("wrong", None):
        with Client(daemon.address, token=token) as c, pytest.raises(Unauthenticated):
            c.info()
    with grpc.insecure_channel(daemon.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_random_requests_always_get_an_answer_or_a_status(daemon, client):
    """Hundreds of random requests: each gets chunks or a status the API documents, and
    the daemon keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64))
    ints = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))
    options = st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.one_of(st.integers(-3, 6), ints),
            "temperature": floats,
            "top_p": floats,
            "top_k": ints,
            "min_p": floats,
            "repetition_penalty": floats,
            "seed": st.integers(-(2**63), 2**63 - 1),
            "stop": st.lists(st.text(max_size=300), max_size=20),
            "draft_tokens": st.one_of(st.integers(-2, 20), ints),
        },
    )
    prompts = st.one_of(
        st.text(max_size=300),
        st.lists(st.integers(0, 2**32 - 1), max_size=40),
    )
    messages = st.lists(
        st.tuples(st.sampled_from(["user", "system", "assistant", "tool", "bot", ""]), st.text()),
        max_size=4,
    )
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    stub = api_grpc.InferenceStub(grpc.insecure_channel(daemon.address))
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prompt=prompts, chat=messages, opts=options, use_chat=st.booleans())
    def one_request(prompt, chat, opts, use_chat):
        opts = {k: v for k, v in opts.items() if v is not None}
        opts["max_tokens"] = min(opts.get("max_tokens", 3), 3)  # keep generations short
        try:
            message = api.GenerationOptions(**opts)
        except (ValueError, TypeError):
            return  # not representable on the wire
        if use_chat:
            msgs = [api.ChatMessage(role=r, content=c) for r, c in chat]
            call = stub.Chat(api.ChatRequest(messages=msgs, options=message), metadata=metadata)
        elif isinstance(prompt, str):
            request = api.GenerateRequest(prompt=prompt, options=message)
            call = stub.Generate(request, metadata=metadata)
        else:
            request = api.GenerateRequest(prompt_token_ids=prompt, options=message)
            call = stub.Generate(request, metadata=metadata)
        try:
            chunks = list(call)
        except grpc.RpcError as e:
            assert e.code() in allowed, (e.code(), e.details())
            assert e.details()
            return
        assert chunks[-1].finish_reason in (api.FINISH_REASON_STOP, api.FINISH_REASON_LENGTH)

    one_request()
    assert client.generate("Still here", max_tokens=3, ignore_eos=True).completion_tokens == 3
    assert held(client.stats()) == [0, 0]


def test_cli_generate_has_run_fields_and_info_stats_chat_work(
    daemon, model, tmp_path, capsys, monkeypatch
):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    remote = ["--address", daemon.address, "--api-token-file", str(token_file)]
    flags = ["--max-tokens", "8", "--json", "--temperature", "0.7", "--seed", "3"]
    assert main(["generate", "Hello", "--raw", *flags, *remote]) == 0
    served = json.loads(capsys.readouterr().out)
    local = ["--model", str(model), "--workers", "2", "--device", "cpu", "--threads", "1"]
    assert main(["run", "Hello", "--raw", *flags, *local, "--cache-memory", "32M"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert served.keys() == ran.keys()
    assert served["token_ids"] == ran["token_ids"] and served["text"] == ran["text"]
    assert served["workers"] == ran["workers"] == 2

    assert main(["info", "--json", *remote]) == 0
    assert json.loads(capsys.readouterr().out)["workers"][1]["end_layer"] == 4
    assert main(["stats", "--json", *remote]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert isinstance(stats["requests"], int) and stats["requests"] > 0

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain\n"))
    assert main(["chat", "--max-tokens", "4", "--json", *remote]) == 0
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(replies) == 2 and replies[1]["prompt_tokens"] > replies[0]["prompt_tokens"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def small_daemon(model, tmp_path_factory, certificate):
    """No token, one sequence at a time, one waiting, a TLS TCP listener, metrics, and
    no worker restarts."""
    cert, key = certificate
    live = LiveDaemon(
        model,
        tmp_path_factory.mktemp("small"),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--max-seqs",
        "1",
        "--max-queue",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-restarts",
        "0",  # a dead worker fails the pipeline (tests/test_supervision.py restarts them)
    )
    yield live
    assert live.stop() == 0, live.log.read_text()


def test_tls_on_the_tcp_listener(small_daemon, certificate):
    port = small_daemon.announced("mtpd: listening on ").split("127.0.0.1:")[1].split()[0]
    with Client(f"127.0.0.1:{port}", tls_ca=str(certificate[0]), timeout=30) as c:
        assert c.generate("tls", max_tokens=2, ignore_eos=True).completion_tokens == 2
    with Client(f"127.0.0.1:{port}", timeout=5) as plain, pytest.raises(Unavailable):
        plain.info()


def test_nothing_listens_beyond_loopback(small_daemon):
    """The daemon and its workers (the data plane's rendezvous and gloo included)."""
    daemon = psutil.Process(small_daemon.process.pid)
    listening = [
        (p.pid, c.laddr)
        for p in [daemon, *daemon.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the TCP listener should be there"
    assert all(_loopback(addr.ip) for _, addr in listening), listening


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_a_full_admission_queue_is_resource_exhausted(small_daemon):
    with Client(small_daemon.address) as c:
        running = c.stream("a", max_tokens=200, ignore_eos=True)
        next(iter(running))
        waiting = c.stream("b", max_tokens=2, ignore_eos=True)
        wait_for(lambda: c.stats().queued == 1)
        with pytest.raises(Overloaded, match="queue"):
            c.generate("c", max_tokens=2)
        running.cancel()
        assert [d.token_ids for d in waiting] and waiting.result.completion_tokens == 2
        assert c.stats().rejected == 1

    url = small_daemon.announced("mtpd: metrics on ")
    with urllib.request.urlopen(url, timeout=30) as page:
        families = {f.name: f for f in text_string_to_metric_families(page.read().decode())}
    value = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert value[("mtpd_requests_total", ())] >= 2
    assert value[("mtpd_requests_rejected_total", ())] == 1
    assert value[("mtpd_requests_finished_total", (("reason", "length"),))] >= 1
    assert value[("mtpd_generated_tokens_total", ())] >= 2
    assert value[("mtpd_kv_cache_slots", (("worker", "1"),))] >= 1
    assert value[("mtpd_stage_steps_total", (("worker", "0"),))] > 0
    assert value[("mtpd_queue_depth", ())] == 0


def test_node_client_streams_a_generation(daemon, client, tmp_path):
    """node-client, installed with npm from its lockfile, against the live daemon."""
    work = tmp_path / "node"
    work.mkdir()
    for name in ("package.json", "package-lock.json", "generate.js"):
        shutil.copy(REPO / "node-client" / name, work)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=work, check=True, timeout=600)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {"PATH": os.environ["PATH"], "MTPD_PROTO_ROOT": str(REPO / "protos")}
    base = ["node", "generate.js", "--address", daemon.address, "--token-file", str(token_file)]

    def node(*args: str) -> subprocess.CompletedProcess:
        command = [*base, *args]
        return subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=120
        )

    want = client.generate("Hello", max_tokens=12)
    out = node("--raw", "--max-tokens", "12", "--json", "Hello")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == want.token_ids and result["text"] == want.text
    assert result["finish_reason"] == want.finish_reason
    assert result["usage"]["completion_tokens"] == want.completion_tokens
    assert node("--raw", "--max-tokens", "12", "Hello").stdout == want.text + "\n"
    refused = node("--max-tokens", "0", "Hello")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
    assert "max_tokens" in refused.stderr
    # Structured output: the Python SDK's tokens, JSON valid against the schema.
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    want = client.generate("Hello", max_tokens=16, structured_output={"json_schema": schema})
    out = node(
        "--raw",
        "--max-tokens",
        "16",
        "--json-schema",
        str(tmp_path / "schema.json"),
        "--json",
        "Hello",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == want.token_ids and result["finish_reason"] == "stop"
    jsonschema.validate(json.loads(result["text"]), schema)
    if os.geteuid() != 0:  # only root makes a socket another user's (CI runs as root)
        return
    # A socket another user planted is refused before anything is sent.
    with planted_socket(tmp_path / "planted") as (planted, listener):
        os.chown(planted, OTHER_UID, OTHER_UID)
        out = subprocess.run(
            ["node", "generate.js", "--address", str(planted), "Hello"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 1 and f"belongs to uid {OTHER_UID}" in out.stderr, out.stderr
        assert nothing_connected(listener)


def test_the_socket_is_private_and_never_taken_from_another_daemon(daemon, tmp_path, capsys):
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert main(["serve", "--socket", str(daemon.socket)]) == 2
    assert "already serving" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert main(["serve", "--socket", str(notes)]) == 2
    assert "not a socket" in capsys.readouterr().err and notes.read_text() == "keep me"


def test_a_dead_worker_turns_health_not_serving_and_calls_unavailable(small_daemon):
    with Client(small_daemon.address) as c:
        os.kill(c.info().workers[1].pid, signal.SIGKILL)
        with grpc.insecure_channel(small_daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
            )
        with pytest.raises(Unavailable, match="worker 1"):
            c.generate("after", max_tokens=2)


def test_a_pickle_is_refused_on_the_wire_and_nowhere_unpickled(daemon, client):
    """Bytes that are a pickle (of a harmless object) sent as a request: refused by
    the protobuf parser; and no module of mtpd can unpickle anything."""
    import ast
    import pickle

    payload = pickle.dumps({"prompt": "hello", "options": {"max_tokens": 4}})
    with grpc.insecure_channel(daemon.address) as channel:
        generate = channel.unary_stream(
            "/mtpd.v1.Inference/Generate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(generate(payload, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert refused.value.code() != grpc.StatusCode.OK
    assert client.generate("ok", max_tokens=2, ignore_eos=True).completion_tokens == 2

    banned = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    for path in REPO.glob("*/**/*.py"):
        parts = path.relative_to(REPO).parts
        # Not virtual environments in the clone (.venv, .ci/venv): they are not mtpd.
        if {"tests", "node_modules", "build"} & set(parts) or parts[0].startswith("."):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not banned & {n.split(".")[0] for n in names}, f"{path}: {names}"
            if isinstance(node, ast.Attribute) and node.attr == "load":
                target = ast.unparse(node.value)
                assert target != "torch", f"{path}:{node.lineno}: torch.load"
