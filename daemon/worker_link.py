"""The daemon's side of one worker: its process (when local) and its link (gRPC, and the
step socket of a local one)."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from mtpd import step_socket
from mtpd.rpc import CHANNEL_OPTIONS, WorkerTLS, bearer_metadata, worker_plane_channel
from mtpd.v1 import worker_pb2 as pb
from mtpd.v1 import worker_pb2_grpc as pb_grpc

# A local worker's socket appears only once it has imported torch (about a second), and
# gRPC's reconnect backoff (1 s, growing) would leave a ready worker unasked up to that
# much longer: a local unix socket is cheap to try every 50 ms.
_LOCAL_LINK_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 50),
]


class WorkerError(RuntimeError):
    """A worker failed to start, load, or step."""


class LocalWorker:
    """A `mtpd worker` child process listening on unix sockets in the runtime dir: gRPC's,
    and its step socket."""

    def __init__(self, index: int, runtime_dir: Path, device: str, threads: int) -> None:
        self.index = index
        self.socket = runtime_dir / f"worker-{index}.sock"
        self.step_socket = runtime_dir / f"worker-{index}.steps"
        self.log_path = runtime_dir / f"worker-{index}.log"
        self.address = f"unix:{self.socket}"
        # -P: the caller's directory stays off sys.path, so nothing there named like a
        # module of ours shadows the installed package. The working directory itself is
        # kept: a relative --model path means the same to the worker as to the daemon.
        cmd = [sys.executable, "-P", "-m", "mtpd", "worker", "--listen", self.address]
        cmd += ["--device", device, "--threads", str(threads), "--parent-pid", str(os.getpid())]
        cmd += ["--step-socket", str(self.step_socket)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def link(self, transport: str) -> WorkerLink:
        """The daemon's link to this worker. Its steps go over the step socket unless
        the daemon relays activations in them (`--transport grpc`, the fallback where no
        process group forms): the socket is measured and tested for steps of tokens."""
        return WorkerLink(
            self.address, step_socket=self.step_socket if transport == "dist" else None
        )

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def describe_exit(self, with_log: bool = False) -> str | None:
        """Why the process is gone, or None while it runs. The end of its log is for the
        operator (a failed start, the daemon's log), never for callers of the API."""
        code = self.process.poll()
        if code is None:
            return None
        tail = self.log_tail() if with_log else ""
        return f"worker {self.index} exited with code {code}" + (f":\n{tail}" if tail else "")

    def kill(self) -> None:
        """At once, even a stopped (SIGSTOP) process."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class _SocketSteps:
    """The writing end of a step stream on a worker's step socket. A frame goes out at
    once where the socket's buffer takes it, as it always does for a step of tokens;
    else the rest waits for a writer thread, and later frames queue behind it. So a send
    never blocks its caller: the pipeline sends under the lock its reply readers take,
    and a worker blocked writing a large reply reads nothing until its reader does. The
    queue holds at most the steps in flight and releases (the pipeline's own bound)."""

    def __init__(self, path: Path, connect_timeout: float = 10.0) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.conn.settimeout(connect_timeout)  # past a full backlog, connect would wait
            self.conn.connect(str(path))
            self.conn.settimeout(None)
        except OSError:
            self.conn.close()
            raise
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._backlog: deque[bytes | memoryview] = deque()
        self._ended = False
        self._writer: threading.Thread | None = None

    def send(self, payload: bytes) -> None:
        frame: bytes | memoryview = step_socket.frame(step_socket.MESSAGE, payload)
        with self._lock:
            if self._ended:
                return
            if not self._backlog:
                try:
                    sent = self.conn.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # broken: the reader reports it
                if sent == len(frame):
                    return
                frame = memoryview(frame)[sent:]
            self._backlog.append(frame)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, daemon=True)
                self._writer.start()
            self._more.notify()

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._backlog and not self._ended:
                    self._more.wait()
                if self._ended:
                    return
                chunk = self._backlog[0]  # kept queued while it goes: later frames wait
            try:
                self.conn.sendall(chunk)
            except OSError:
                return  # broken: the reader reports it
            with self._lock:
                self._backlog.popleft()

    def end(self) -> None:
        """No more frames; the worker and the reader see the stream end."""
        with self._lock:
            self._ended = True
            self._more.notify()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # a blocked sendall or recv returns
        if self._writer is not None:
            self._writer.join()


class WorkerLink:
    """The gRPC connection to one worker, with its step stream (on the worker's step
    socket where it has one, else gRPC's).

    Steps are written into the stream in call order; replies come back in the same
    order on a reader thread and go to `on_reply` (or the stream's end to `on_error`).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: WorkerTLS | None = None,
        step_socket: Path | None = None,
    ) -> None:
        self.address = address
        options = _LOCAL_LINK_OPTIONS if address.startswith("unix:") else CHANNEL_OPTIONS
        self.channel = worker_plane_channel(address, tls, options)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.metadata = bearer_metadata(token)
        self.step_socket = step_socket
        self._outbox: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()
        self._socket: _SocketSteps | None = None
        self._reader: threading.Thread | None = None
        self._ended_here = threading.Event()

    def info(self, timeout: float) -> pb.WorkerInfo:
        return self.stub.GetInfo(
            pb.InfoRequest(), timeout=timeout, wait_for_ready=True, metadata=self.metadata
        )

    def load(self, request: pb.LoadRequest) -> pb.LoadReply:
        return self.stub.Load(request, metadata=self.metadata)

    def stats(self, timeout: float = 10.0) -> pb.WorkerStats:
        return self.stub.GetStats(pb.StatsRequest(), timeout=timeout, metadata=self.metadata)

    def reset(self, rendezvous: str) -> None:
        self.stub.Reset(pb.ResetRequest(rendezvous=rendezvous), metadata=self.metadata)

    def open_steps(
        self,
        on_reply: Callable[[pb.StepReply], None],
        on_error: Callable[[str, bool], None],
    ) -> None:
        """`on_error(message, bystander)`: a bystander's step failed only because a
        neighbour on the data plane went away (the worker says so with ABORTED)."""
        self._ended_here = ended_here = threading.Event()
        if self.step_socket is not None:
            try:
                self._socket = _SocketSteps(self.step_socket)
            except OSError as e:
                raise WorkerError(f"worker {self.address}: its step socket: {e}") from e
            read = functools.partial(self._read_socket, self._socket.conn, on_reply)
        else:
            self._outbox = queue.SimpleQueue()
            replies = self.stub.Step(self._requests(self._outbox), metadata=self.metadata)
            read = functools.partial(self._read_grpc, replies, on_reply)

        def run() -> None:
            error = read()
            if not ended_here.is_set():  # a stream we end is no failure of the worker's
                on_error(*error)

        self._reader = threading.Thread(target=run, daemon=True, name=f"steps-{self.address}")
        self._reader.start()

    @staticmethod
    def _read_grpc(
        replies: Iterator[pb.StepReply], on_reply: Callable[[pb.StepReply], None]
    ) -> tuple[str, bool]:
        """Hands on replies until the stream ends; returns why, and if a bystander."""
        try:
            for reply in replies:
                on_reply(reply)
        except grpc.RpcError as e:
            return e.details() or str(e.code()), e.code() == grpc.StatusCode.ABORTED
        return "step stream closed", False

    @staticmethod
    def _read_socket(
        conn: socket.socket, on_reply: Callable[[pb.StepReply], None]
    ) -> tuple[str, bool]:
        try:
            while (frame := step_socket.read_frame(conn)) is not None:
                kind, payload = frame
                if kind == step_socket.END:
                    end = pb.StepStreamEnd.FromString(payload)
                    return end.message, end.bystander
                on_reply(pb.StepReply.FromString(payload))
        except (OSError, step_socket.FrameError, DecodeError) as e:
            return f"step stream broken: {e}", False
        return "step stream closed", False

    @staticmethod
    def _requests(outbox: queue.SimpleQueue) -> Iterator[pb.StepRequest]:
        while (request := outbox.get()) is not None:
            yield request

    def close_steps(self, timeout: float = 30.0) -> None:
        """End the step stream and wait for its reader (its errors are expected now)."""
        self._end_steps()
        self._join_reader(timeout)

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
        if self._socket is not None:
            self._socket.conn.close()  # after its reader: the descriptor is not reused under it

    def send(self, request: pb.StepRequest) -> None:
        """Queued (gRPC), or written to the step socket without blocking. A broken stream
        is for the reader to report."""
        if self.step_socket is None:
            self._outbox.put(request)
        elif self._socket is not None:
            self._socket.send(request.SerializeToString())

    def _end_steps(self) -> None:
        """End the step stream: no more sends; the worker and the reader see its end."""
        self._ended_here.set()
        if self._socket is not None:
            self._socket.end()
        else:
            self._outbox.put(None)

    def close(self) -> None:
        self._end_steps()
        if self._socket is not None:  # its reader ends as the socket shuts down
            self._join_reader(timeout=5.0)
        self.channel.close()
