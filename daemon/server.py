"""`mtpd serve`: the daemon's gRPC front. It listens at once (health NOT_SERVING), loads
the model on its workers, turns SERVING, and serves until SIGTERM or SIGINT.

Listens on a unix socket (mode 0660) by default and on TCP only when asked. With an API
token, every call but the health check must carry it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h11
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from uvicorn.protocols.http.h11_impl import H11Protocol

from mtpd.address import tcp_listen
from mtpd.daemon.coordinator import Coordinator, Settings
from mtpd.daemon.frontend import Frontend, Limits
from mtpd.daemon.metrics import serve_metrics
from mtpd.daemon.openai_api import OpenAIApp
from mtpd.daemon.request_parsing import ParseRequests
from mtpd.daemon.service import InferenceService
from mtpd.daemon.systemd import Notifier
from mtpd.model.errors import InputError
from mtpd.rpc import bearer_token_matches, refusing_handler
from mtpd.v1 import inference_pb2 as api
from mtpd.v1 import inference_pb2_grpc as api_grpc

log = logging.getLogger("mtpd.daemon")

INFERENCE = api.DESCRIPTOR.services_by_name["Inference"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# gRPC's own receive limit sits far above the request-size limit, so an oversized
# request reaches the handler and is told which limit it broke.
RECEIVE_LIMIT_FLOOR = 64 << 20


@dataclass(frozen=True)
class ServeConfig:
    socket: Path
    listen: str | None = None  # HOST:PORT
    tls_cert: Path | None = None  # PEM certificate chain and key for the TCP listener
    tls_key: Path | None = None
    api_token: str | None = None
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint
    http: str | None = None  # HOST:PORT of the OpenAI-compatible HTTP API
    served_model_name: str | None = None  # its model id (default: the model's name)
    limits: Limits = field(default_factory=Limits)
    drain_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without the API token (UNAUTHENTICATED); the health check is open,
    as supervisors probe it without credentials and it reveals nothing."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH}/"):
            return handler
        if bearer_token_matches(details.invocation_metadata, self._token):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "a valid API token is required: send 'authorization: Bearer <token>'"

    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    return refusing_handler(handler, refuse, refuse_stream)


def _claim_socket(path: Path) -> None:
    """Make way for our socket in a directory no other user controls: refuse if a
    daemon answers there, remove a stale socket (never any other file)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = path.parent.lstat()
    except OSError as e:
        raise InputError(f"{path.parent}: cannot use it for the socket: {e.strerror}") from None
    others_write = folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX
    if folder.st_uid not in (os.geteuid(), 0) or others_write or stat.S_ISLNK(folder.st_mode):
        raise InputError(
            f"{path.parent}: another user owns or can write this directory; "
            "choose a --socket in a directory of your own"
        )
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InputError(f"{path}: exists and is not a socket; choose another --socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot use this socket: {e.strerror}") from None
    else:
        raise InputError(f"{path}: another mtpd is already serving there")
    finally:
        probe.close()


async def _set_health(health: health_aio.HealthServicer, status: int) -> None:
    for name in ("", INFERENCE):
        await health.set(name, status)


async def _monitor(front: Frontend, health: health_aio.HealthServicer, notifier: Notifier) -> None:
    """WATCHDOG=1 under a systemd watchdog while the event loop runs, so a wedged daemon
    stops pinging; so does one whose pipeline failed for good (--max-restarts 0), for
    systemd to restart it. A pipeline waiting for a worker's restart budget heals by
    itself, which a daemon restart would only delay. Health follows the pipeline:
    NOT_SERVING while it cannot generate, SERVING again once it can."""
    every = Notifier.watchdog_interval()
    failure: str | None = None
    while True:
        pipeline = None if front.daemon is None else front.daemon.pipeline
        if every is not None and not (pipeline is not None and pipeline.failed_for_good):
            notifier.watchdog()
        now = None if pipeline is None else pipeline.failure
        if now != failure and pipeline is not None and not front.draining:
            if now is not None:
                log.error("the pipeline cannot generate: %s", now)
                notifier.status(f"unavailable: {now}")
            else:
                log.warning("the pipeline is back")
                notifier.status("serving")
            serving = health_pb2.HealthCheckResponse.SERVING
            await _set_health(
                health, health_pb2.HealthCheckResponse.NOT_SERVING if now else serving
            )
            failure = now
        await asyncio.sleep(min(every or 0.5, 0.5))


async def _drain(front: Frontend, notifier: Notifier, seconds: float) -> None:
    """Give the running generations up to `seconds` to finish."""
    deadline = time.monotonic() + seconds
    told = None
    while front.running and time.monotonic() < deadline:
        if told != front.running:
            told = front.running
            notifier.stopping(f"draining: {told} request(s) still running")
        await asyncio.sleep(0.1)
    if front.running:
        log.warning("%d request(s) still running after the drain timeout", front.running)


def _tls(config: ServeConfig) -> tuple[bytes, bytes] | None:
    """(key, certificate chain) when TLS is configured."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    try:
        return config.tls_key.read_bytes(), config.tls_cert.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the TLS key or certificate: {e}") from None


def _warn_if_clear(flag: str, where: str, config: ServeConfig) -> None:
    host = where.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]") or not config.api_token:
        log.warning("%s %s without TLS: traffic is in the clear", flag, where)


def _listen_tcp(server: grpc.aio.Server, config: ServeConfig) -> str:
    """Add the TCP listener (with TLS when a certificate is given); returns HOST:PORT."""
    host = config.listen.rsplit(":", 1)[0]
    credentials = None
    if pair := _tls(config):
        credentials = grpc.ssl_server_credentials([pair])
    else:
        _warn_if_clear("--listen", config.listen, config)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError as e:
        raise InputError(f"--listen {config.listen}: cannot listen there ({e})") from None
    return f"{host}:{port}" + (" (TLS)" if credentials else "")


HEADER_TIMEOUT_S = 10.0  # for a request's headers, from its connection or the last reply


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on every request's headers: a client
    that connects and sends nothing, or its headers a byte at a time, is dropped, so
    idle connections hold nothing for long. (uvicorn's limit_concurrency counts such
    connections: a few hundred of them made every request, /health too, answer 503.)"""

    _headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        self._headers_due = self.loop.call_later(HEADER_TIMEOUT_S, self._drop_if_waiting)

    def _drop_if_waiting(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on the daemon's event loop; the daemon handles the signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen_http(
    front: Frontend, config: ServeConfig
) -> tuple[_EmbeddedUvicorn, socket.socket, str]:
    """Bind the HTTP API's socket (errors name the flag); returns the server to run on it."""
    host, port, family = tcp_listen(config.http)
    tls = _tls(config)
    if tls is None:
        _warn_if_clear("--http", config.http, config)
    try:
        sock = socket.create_server((host, int(port)), family=family)
    except (OSError, ValueError) as e:
        raise InputError(f"--http {config.http}: cannot listen there ({e})") from None
    app = OpenAIApp(
        front, config.served_model_name, config.api_token, metrics=config.metrics_listen is None
    )
    http_config = uvicorn.Config(
        app.app,
        log_config=None,
        access_log=False,
        lifespan="off",
        # Requests are bounded by admission (--max-seqs, --max-queue: then 429), idle and
        # slow connections by the header deadline, connections by the process's files.
        http=_HeaderDeadline,
        timeout_graceful_shutdown=1,
        ssl_certfile=config.tls_cert if tls else None,
        ssl_keyfile=config.tls_key if tls else None,
    )
    try:
        http_config.load()  # here, so a bad certificate is an error that names it
    except (OSError, ValueError) as e:
        sock.close()
        raise InputError(f"--http with --tls-cert/--tls-key: {e}") from None
    scheme = "https" if tls else "http"
    return _EmbeddedUvicorn(http_config), sock, f"{scheme}://{host}:{sock.getsockname()[1]}"


async def serve_async(settings: Settings, config: ServeConfig) -> int:
    front = Frontend(config.limits)
    health = health_aio.HealthServicer()
    receive_limit = max(RECEIVE_LIMIT_FLOOR, 2 * config.limits.max_request_bytes)
    server = grpc.aio.server(
        # The token is checked before a request is even parsed.
        interceptors=[BearerAuth(config.api_token)] * bool(config.api_token) + [ParseRequests()],
        options=[("grpc.max_receive_message_length", receive_limit)],
        # Every stream holds a slot: running and queued requests, plus room for probes.
        maximum_concurrent_rpcs=settings.pipeline.max_seqs + settings.max_queue + 32,
    )
    api_grpc.add_InferenceServicer_to_server(InferenceService(front), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([INFERENCE, HEALTH, reflection.SERVICE_NAME], server)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)

    _claim_socket(config.socket)
    umask = os.umask(0o117)  # the socket is born 0660: never open to others, not even briefly
    try:
        server.add_insecure_port(f"unix:{config.socket}")
    finally:
        os.umask(umask)
    listening = f"unix:{config.socket}"
    if config.listen:
        listening += f" and {_listen_tcp(server, config)}"
    await server.start()
    if config.metrics_listen:
        where, _ = serve_metrics(front, config.metrics_listen, config.api_token)
        print(f"mtpd: metrics on http://{where}/metrics", file=sys.stderr, flush=True)
    http: asyncio.Task | None = None
    if config.http:
        http_server, http_socket, where = _listen_http(front, config)
        http = asyncio.create_task(http_server.serve(sockets=[http_socket]))
        print(f"mtpd: OpenAI-compatible HTTP API on {where}/v1", file=sys.stderr, flush=True)
    print(f"mtpd: listening on {listening}", file=sys.stderr, flush=True)
    notifier = Notifier()
    notifier.status(f"listening on {listening}; starting the workers")

    def on_status(text: str) -> None:
        log.info("%s", text)
        notifier.status(text)

    monitor = asyncio.create_task(_monitor(front, health, notifier))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.ensure_future(asyncio.to_thread(Coordinator.start, settings, on_status))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    daemon: Coordinator | None = None
    try:
        try:
            daemon = await loading  # a load cannot be interrupted; stopping waits for it
        except InputError as e:
            print(f"mtpd: error: {e}", file=sys.stderr, flush=True)
            return 2
        except Exception as e:
            log.exception("loading the model failed")
            print(f"mtpd: error: loading the model failed: {e}", file=sys.stderr, flush=True)
            return 1
        if stop.is_set():
            return 0
        for note in daemon.notes:
            print(f"mtpd: note: {note}", file=sys.stderr, flush=True)
        front.daemon = daemon
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        stages = ", ".join(
            f"layers {s.first_layer}-{s.end_layer - 1} on {s.device}"
            for s in daemon.pipeline.stages
        )
        print(f"mtpd: ready: {daemon.model_path} ({stages})", file=sys.stderr, flush=True)
        notifier.ready(f"serving {daemon.model_path.name} on {listening}")
        await stopping
        front.draining = True  # before health says so: a caller who saw it is refused
        notifier.stopping("stopping: no new requests")
        await health.enter_graceful_shutdown()
        await _drain(front, notifier, config.drain_s)
    finally:
        stopping.cancel()
        monitor.cancel()
        await health.enter_graceful_shutdown()
        if http is not None:
            http_server.should_exit = True
            await asyncio.wait([http], timeout=5.0)
        await server.stop(1.0)
        if daemon is not None:
            daemon.close()
        notifier.close()
        with contextlib.suppress(OSError):
            config.socket.unlink()
    return 0


def serve(settings: Settings, config: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _raise_open_files()
    return asyncio.run(serve_async(settings, config))


def _raise_open_files() -> None:
    """Every connection is a file: the soft limit (often 1024) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
