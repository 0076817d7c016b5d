"""A live `mtpd serve` for integration tests: the real daemon process, its worker
processes and its gRPC API, on a tiny random model with a chat template and an MTP head."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_models import add_mtp_head, write_char_tokenizer, write_tiny_model

# Roles as markup the character tokenizer spells out; "</s>" is its end-of-sequence.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONTEXT = 256
OTHER_UID = 54321  # no user of this machine: the owner a planted socket is given


def write_served_model(path: Path) -> Path:
    write_tiny_model(path, "llama", layers=4, vocab=98)
    write_char_tokenizer(path, CHAT_TEMPLATE)
    add_mtp_head(path)
    return path


def self_signed_certificate(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: (certificate, key)."""
    cert, key = where / "cert.pem", where / "key.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*request, *subject, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return cert, key


@contextlib.contextmanager
def planted_socket(folder: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A Unix socket listening at `folder`/mtpd.sock (the folder is made), as another
    local user would plant where a client looks for the daemon: (its path, the listener,
    non-blocking for `nothing_connected`). The caller makes it, or its folder, another
    user's (`os.chown` to OTHER_UID: only root can)."""
    folder.mkdir()
    path = folder / "mtpd.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(4)
        listener.setblocking(False)
        yield path, listener


def nothing_connected(listener: socket.socket) -> bool:
    """Whether no client has connected to the (non-blocking) `listener`."""
    try:
        listener.accept()
    except BlockingIOError:
        return True
    return False


def http_request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | dict | list | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """One raw HTTP exchange (what no SDK sends); `path` is under the server's root."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        content = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn.request(method, path, body=content, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def held(stats) -> list[int]:
    """Each worker's sequences beyond the finished requests' caches kept for later
    prompts (prefix caching): what running or leaked requests hold."""
    return [w.cached_sequences - stats.prefix_caches for w in stats.workers]


def wait_for(predicate, timeout: float = 30.0):
    """Poll until `predicate()` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return value


class LiveDaemon:
    def __init__(
        self,
        model: Path,
        workdir: Path,
        *flags: str,
        token: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "mtpd.sock"
        self.address = f"unix:{self.socket}"
        self.token = token
        cmd = [sys.executable, "-m", "mtpd", "serve", "--model", str(model), "--device", "cpu"]
        cmd += ["--workers", "2", "--threads", "1", "--socket", str(self.socket)]
        cmd += ["--max-context", str(CONTEXT), "--cache-memory", "64M", *flags]
        if token:
            token_file = workdir / "api-token"
            token_file.write_text(token + "\n")
            cmd += ["--api-token-file", str(token_file)]
        self.log = workdir / "daemon.log"
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            env={**os.environ, **(env or {})},
        )
        self.health_seen = self._await_serving()

    def _await_serving(self, timeout: float = 120) -> list[str]:
        """Health statuses observed from the first answer until SERVING."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        # Retry the connection every 50 ms: with gRPC's default backoff (1 s, growing)
        # the first answer could come only after the model had loaded, and the
        # NOT_SERVING the daemon gives while loading would go unseen.
        options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mtpd serve exited: {self.log.read_text()}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                except grpc.RpcError:
                    time.sleep(0.05)
                    continue
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == "SERVING":
                    return seen
                time.sleep(0.05)
        raise TimeoutError(f"mtpd serve not SERVING after {timeout} s: {self.log.read_text()}")

    @classmethod
    def with_http(
        cls, model: Path, workdir: Path, name: str, token: str, *flags: str, **kw
    ) -> LiveDaemon:
        """With the OpenAI HTTP API too, serving the model as `name`; its base is `url`."""
        flags = ("--http", "127.0.0.1:0", "--served-model-name", name, *flags)
        live = cls(model, workdir, *flags, token=token, **kw)
        live.url = live.announced("mtpd: OpenAI-compatible HTTP API on ")
        return live

    def announced(self, prefix: str) -> str:
        """The rest of the daemon's first stderr line that starts with `prefix`."""
        for line in self.log.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise AssertionError(f"no line {prefix!r} in {self.log.read_text()}")

    @contextlib.contextmanager
    def workers_paused(self):
        """Suspend the daemon's child processes (its workers) for the block: a request
        then waits however fast the model decodes, so a test can give up on it."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        assert children, "the daemon has no worker processes"
        for child in children:
            child.suspend()
        try:
            yield
        finally:
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):  # let the test say why
                    child.resume()

    def __enter__(self) -> LiveDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stopped however the block ends: a failed test must not leave a daemon (and
        its workers, restarted within its budget) running."""
        if self.process.poll() is None:
            self.stop()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            raise
