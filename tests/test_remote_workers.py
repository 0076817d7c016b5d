"""Remote workers: `mtpd worker --join` with the shared token, the same mtpd version and
the same model is accepted and gives the local pipeline's output; a wrong token,
another version or another model is refused with a message naming the problem; a
remote worker that dies is replaced by one that joins again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from live_daemon import LiveDaemon, self_signed_certificate, wait_for
from tiny_models import write_char_tokenizer, write_tiny_model

from mtpd.client import Client
from mtpd.rpc import CHANNEL_OPTIONS, bearer_metadata
from mtpd.v1 import worker_pb2 as pb
from mtpd.v1 import worker_pb2_grpc as pb_grpc

MTPD = [sys.executable, "-m", "mtpd"]
PROMPT = ["abracadabra", "--raw", "--max-tokens", "24", "--json", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    for name, seed in (("model", 0), ("other", 5)):
        write_tiny_model(root / name, "llama", layers=4, vocab=98, seed=seed)
        write_char_tokenizer(root / name)
    (root / "token").write_text("s3cret-token\n")
    (root / "wrong").write_text("guess\n")
    return root


@pytest.fixture(scope="module")
def local(models) -> dict:
    """The local pipeline's output for PROMPT, run once: what each remote pipeline (with
    or without TLS) must give."""
    return run_json(["run", "--model", str(models / "model"), *PROMPT, "--workers", "2"])


def raw_method(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary call of `method` on raw bytes: the payload is sent as it is (it need not be
    a message) and the reply comes back unparsed."""
    return channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


def peak_memory_mb(pid: int) -> int:
    """The process's peak resident set (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024


def run_json(args: list[str], timeout: float = 300) -> dict:
    out = subprocess.run(MTPD + args, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def worker(join: str, token: Path, model: Path) -> list[str]:
    listen = f"127.0.0.1:{free_port()}"
    return [
        *MTPD,
        "worker",
        "--listen",
        listen,
        "--join",
        join,
        "--threads",
        "1",
        "--token-file",
        str(token),
        "--model",
        str(model),
    ]


def test_remote_workers_join_only_with_the_token_and_the_model(models, local):
    join = f"127.0.0.1:{free_port()}"
    remote_flags = ["--join-listen", join, "--token-file", str(models / "token")]
    daemon = subprocess.Popen(
        [*MTPD, "run", "--model", str(models / "model"), *PROMPT, "--workers", "2", *remote_flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    joined = []
    try:
        bad = subprocess.run(
            worker(join, models / "wrong", models / "model"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 2, bad.stderr
        assert "wrong or missing worker token" in bad.stderr

        other = subprocess.run(
            worker(join, models / "token", models / "other"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 2, other.stderr
        assert "different model" in other.stderr

        # The registry (the data plane's rendezvous too) listens on the address given,
        # and nothing else does.
        def listening():
            return [
                c.laddr
                for c in psutil.Process(daemon.pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]

        wait_for(listening)
        assert [a.ip for a in listening()] in (["127.0.0.1"], ["::ffff:127.0.0.1"])
        # Without the token, a call is refused before its request is parsed: bytes that
        # are no JoinRequest get the same answer as a real one.
        with grpc.insecure_channel(join) as channel:
            raw = raw_method(channel, "/mtpd.v1.WorkerRegistry/Join")
            store = raw_method(channel, "/mtpd.v1.WorkerRegistry/Store")
            get = pb.StoreRequest(op=pb.StoreRequest.OP_GET, keys=["x"]).SerializeToString()
            for call, payload in (
                (raw, b"\xff" * 4096),
                (raw, pb.JoinRequest(version="x").SerializeToString()),
                (store, b"\xff" * 4096),
                (store, get),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call(payload, timeout=60)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        with grpc.insecure_channel(join) as channel, pytest.raises(grpc.RpcError) as older:
            pb_grpc.WorkerRegistryStub(channel).Join(
                pb.JoinRequest(version="0.0.1", model_identity="any", address="127.0.0.1:9"),
                metadata=bearer_metadata((models / "token").read_text().strip()),
                timeout=60,
            )
        assert older.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version mismatch" in older.value.details()

        commands = [worker(join, models / "token", models / "model") for _ in range(2)]
        joined = [subprocess.Popen(c, stderr=subprocess.DEVNULL) for c in commands]
        out, err = daemon.communicate(timeout=300)
        # Each worker too refuses a call without the token before reading it (its peak
        # memory does not grow by the 256 MB sent), and a control call with the token
        # over 64 KiB before parsing it.
        token = bearer_metadata((models / "token").read_text().strip())
        for command, process in zip(commands, joined, strict=True):
            listen = command[command.index("--listen") + 1]
            with grpc.insecure_channel(listen, options=CHANNEL_OPTIONS) as channel:
                load = raw_method(channel, "/mtpd.v1.Worker/Load")
                peak = peak_memory_mb(process.pid)
                for payload in (b"\xff" * 4096, bytes(256 << 20)):
                    with pytest.raises(grpc.RpcError) as refused:
                        load(payload, timeout=60)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert peak_memory_mb(process.pid) < peak + 64
                with pytest.raises(grpc.RpcError) as refused:
                    load(b"\xff" * (64 * 1024 + 1), metadata=token, timeout=60)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "Load: a request of 65537 bytes (at most 65536)" in refused.value.details()
        assert daemon.returncode == 0, err
        remote = json.loads(out)
        assert remote["workers"] == 2 and remote["layers_per_worker"] == [2, 2]
        assert remote["token_ids"] == local["token_ids"]
    finally:
        daemon.kill()
        for w in joined:
            w.terminate()
            w.wait(timeout=30)


def test_a_remote_worker_that_dies_is_replaced_by_one_that_joins_again(models, tmp_path):
    """As systemd on the worker's host would: the dead worker's replacement joins, the
    pipeline re-forms, and the running stream continues unchanged."""
    join = f"127.0.0.1:{free_port()}"
    workers = [
        subprocess.Popen(
            worker(join, models / "token", models / "model"), stderr=subprocess.DEVNULL
        )
        for _ in range(2)  # each with a port of its own
    ]
    try:
        with LiveDaemon(
            models / "model",
            tmp_path / "daemon",
            "--join-listen",
            join,
            "--token-file",
            str(models / "token"),
            "--rejoin-timeout",
            "120",
        ) as daemon:
            with Client(daemon.address, timeout=300) as client:
                want = client.generate("abracadabra", max_tokens=40, ignore_eos=True)
                stream = client.stream("abracadabra", max_tokens=40, ignore_eos=True)
                deltas = iter(stream)
                next(deltas)
                victim = client.info().workers[1].pid
                next(w for w in workers if w.pid == victim).kill()
                replacement = worker(join, models / "token", models / "model")
                workers.append(subprocess.Popen(replacement, stderr=subprocess.DEVNULL))
                for _ in deltas:
                    pass
                assert stream.result.token_ids == want.token_ids
                assert client.info().workers[1].pid == workers[-1].pid
            assert daemon.stop() == 0
    finally:
        for w in workers:
            w.kill()
            w.wait(timeout=30)


def test_remote_workers_over_mutual_tls(models, local, tmp_path):
    """With --worker-tls-*, the registry and the workers speak TLS and ask the peer for a
    certificate the CA signed: a plaintext caller, or one without a certificate, cannot
    even send a call; workers with the certificate join, and the output is unchanged."""
    cert, key = self_signed_certificate(tmp_path)

    def tls(prefix: str) -> list[str]:  # one self-signed certificate, its own CA
        return [f"{prefix}-cert", str(cert), f"{prefix}-key", str(key), f"{prefix}-ca", str(cert)]

    join = f"127.0.0.1:{free_port()}"
    remote = ["--join-listen", join, "--token-file", str(models / "token"), *tls("--worker-tls")]
    daemon = subprocess.Popen(
        [*MTPD, "run", "--model", str(models / "model"), *PROMPT, "--workers", "2", *remote],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    joined = []
    try:
        token = bearer_metadata((models / "token").read_text().strip())
        join_request = pb.JoinRequest(version="x", model_identity="y", address="z")
        plain = grpc.insecure_channel(join)
        no_cert = grpc.secure_channel(join, grpc.ssl_channel_credentials(cert.read_bytes()))
        for channel in (plain, no_cert):
            with channel, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.WorkerRegistryStub(channel).Join(join_request, metadata=token, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        commands = [
            [*worker(join, models / "token", models / "model"), *tls("--tls")] for _ in range(2)
        ]
        joined = [subprocess.Popen(c, stderr=subprocess.DEVNULL) for c in commands]
        out, err = daemon.communicate(timeout=300)
        assert daemon.returncode == 0, err
        assert json.loads(out)["token_ids"] == local["token_ids"]
        assert "without TLS" not in err
    finally:
        daemon.kill()
        for w in joined:
            w.terminate()
            w.wait(timeout=30)
