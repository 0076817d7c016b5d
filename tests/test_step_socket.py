"""The step stream on a local worker's unix socket (`mtpd worker --step-socket`): its
frames, the same replies as gRPC's stream for the same steps, one stream at a time, a
malformed frame answered with the reason, and the daemon's local pipelines on it."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from reference import GREEDY
from tiny_models import add_mtp_head, write_tiny_model
from tiny_pipeline import start_pipeline

from mtpd import step_socket
from mtpd.daemon.scheduler import Scheduler
from mtpd.daemon.worker_link import LocalWorker, WorkerLink, _SocketSteps
from mtpd.rpc import MESSAGE_LIMIT, sampling_to_wire
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.server import listen_step_socket

LAYERS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("step-socket") / "model"
    write_tiny_model(path, "llama", layers=LAYERS, vocab=96)
    add_mtp_head(path)
    return path


# -- frames ---------------------------------------------------------------------------


def test_frames_round_trip_and_the_stream_ends_only_between_frames():
    a, b = socket.socketpair()
    with a, b:
        request = pb.StepRequest(step_id=7, release=["x"])
        step_socket.send_frame(a, step_socket.MESSAGE, request.SerializeToString())
        step_socket.send_frame(a, step_socket.END, b"")
        kind, payload = step_socket.read_frame(b)
        assert (kind, pb.StepRequest.FromString(payload)) == (step_socket.MESSAGE, request)
        assert step_socket.read_frame(b) == (step_socket.END, b"")
        a.sendall(struct.pack("<IB", 10, 0) + b"abc")  # 3 of 10 bytes, then the end
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(step_socket.FrameError, match="inside a frame"):
            step_socket.read_frame(b)
        assert step_socket.read_frame(b) is None  # nothing more: the peer closed


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("<IB", MESSAGE_LIMIT + 1, 0), "over the limit"),
        (struct.pack("<IB", 1, 9), "unknown kind 9"),
    ],
)
def test_a_frame_that_is_not_one_is_refused_before_its_payload_is_read(header, message):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header)
        with pytest.raises(step_socket.FrameError, match=message):
            step_socket.read_frame(b)


# -- a worker's step socket -----------------------------------------------------------


@pytest.fixture
def worker(tiny, tmp_path):
    process = LocalWorker(0, tmp_path, "cpu", 1)
    link = WorkerLink(process.address)
    try:
        link.info(timeout=60)
        link.load(
            pb.LoadRequest(
                model=str(tiny), end_layer=LAYERS, dtype="float32", max_seqs=2,
                max_context=64, world_size=1, load_mtp=True,
            )
        )  # fmt: skip
        yield process, link
    finally:
        link.close()
        process.stop()


def first_step() -> pb.StepRequest:
    """A sequence's prompt, opening it."""
    opened = pb.SequenceOpen(seq_id="s", sampling=sampling_to_wire(GREEDY), return_logits=True)
    first = pb.SequenceStep(seq_id="s", keep=0, token_ids=[5, 9, 11, 40], sample=True)
    return pb.StepRequest(step_id=1, sequences=[first], open=[opened])


def run_steps(link: WorkerLink, count: int) -> list[pb.StepReply]:
    """`count` greedy steps of one sequence drafting two tokens, each built from the
    last reply, over `link`'s step stream."""
    replies: list[pb.StepReply] = []
    arrived, errors = threading.Semaphore(0), []
    link.open_steps(lambda r: (replies.append(r), arrived.release()), lambda *e: errors.append(e))
    try:
        request, at = first_step(), 0
        for i in range(count):
            request.sequences[0].draft_tokens = 2
            link.send(request)
            assert arrived.acquire(timeout=60), errors
            result = replies[-1].results[0]
            at += len(request.sequences[0].token_ids) - request.sequences[0].verify
            at += result.accepted
            step = pb.SequenceStep(
                seq_id="s",
                keep=at,
                token_ids=[result.token_ids[-1], *result.draft_token_ids],
                sample=True,
                verify=len(result.draft_token_ids),
            )
            request = pb.StepRequest(step_id=i + 2, sequences=[step])
    finally:
        link.close_steps()
    assert not errors
    return replies


def test_the_socket_gives_the_replies_grpc_gives(tiny, tmp_path, worker):
    process, grpc_link = worker
    over_grpc = run_steps(grpc_link, 4)
    grpc_link.reset(str(tmp_path / "rendezvous-1"))  # caches dropped: the same steps again
    socket_link = WorkerLink(process.address, step_socket=process.step_socket)
    try:
        over_socket = run_steps(socket_link, 4)
    finally:
        socket_link.close()
    assert over_socket[-1].results[0].draft_token_ids  # the head drafted
    assert [r.results for r in over_socket] == [r.results for r in over_grpc]


def connect(process: LocalWorker) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(process.step_socket))
    conn.settimeout(60)
    return conn


def test_one_step_stream_at_a_time_and_a_malformed_frame_ends_it_with_the_reason(worker):
    process, link = worker
    first = connect(process)
    with first:
        # While it is open, gRPC's step stream is refused: the socket's holds the lock.
        step_socket.send_frame(first, step_socket.MESSAGE, first_step().SerializeToString())
        kind, payload = step_socket.read_frame(first)
        assert kind == step_socket.MESSAGE and pb.StepReply.FromString(payload).results
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(link.stub.Step(iter([pb.StepRequest(step_id=2)]))))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "a step stream is already open" in refused.value.details()
        with connect(process) as other:  # and so is a second connection, at once
            kind, payload = step_socket.read_frame(other)
            assert kind == step_socket.END
            assert pb.StepStreamEnd.FromString(payload).message == "a step stream is already open"
        first.sendall(struct.pack("<IB", 3, 0) + b"\xff\xff\xff")  # not a StepRequest
        kind, payload = step_socket.read_frame(first)
        end = pb.StepStreamEnd.FromString(payload)
        assert kind == step_socket.END and "a malformed step frame" in end.message
        assert not end.bystander
        assert step_socket.read_frame(first) is None
    with connect(process) as second:  # the next stream is served
        step_socket.send_frame(
            second, step_socket.MESSAGE, pb.StepRequest(step_id=3).SerializeToString()
        )
        kind, payload = step_socket.read_frame(second)
        assert (kind, pb.StepReply.FromString(payload).step_id) == (step_socket.MESSAGE, 3)


@pytest.mark.parametrize(("transport", "on_socket"), [("dist", True), ("grpc", False)])
def test_a_local_pipeline_steps_over_the_socket_unless_it_relays_activations(
    tiny, transport, on_socket
):
    pipeline = start_pipeline(tiny, LAYERS, 1, transport=transport)
    try:
        scheduler = Scheduler(pipeline, eos_ids=set())
        try:
            assert len(scheduler.submit([5, 9, 11], GREEDY, max_tokens=6).result().token_ids) == 6
        finally:
            scheduler.close()
        # The daemon's stream holds the worker's step lock: gRPC's is refused if the
        # daemon's is the socket's, else the socket's is.
        if on_socket:
            with pytest.raises(grpc.RpcError, match="a step stream is already open"):
                next(iter(pipeline.links[0].stub.Step(iter([pb.StepRequest(step_id=99)]))))
        else:
            with connect(pipeline.processes[0]) as conn:
                kind, payload = step_socket.read_frame(conn)
                assert kind == step_socket.END
                assert "already open" in pb.StepStreamEnd.FromString(payload).message
    finally:
        pipeline.close()


class _FailingOnce:
    """A worker service whose first step stream fails with a bug, the next one works."""

    def __init__(self) -> None:
        self.streams = 0
        self.pool = ThreadPoolExecutor(1)
        self.step_stream_open = False

    def submit_compute(self, fn, *args):
        return self.pool.submit(fn, *args)

    def serve_steps(self, requests, on_compute_thread):
        self.streams += 1
        for request in requests:
            if self.streams == 1:
                raise RuntimeError("a bug")
            yield pb.StepReply(step_id=request.step_id)


def test_a_stream_that_fails_with_a_bug_ends_with_the_reason_and_the_next_is_served(tmp_path):
    service = _FailingOnce()
    listener = listen_step_socket(service, str(tmp_path / "steps"))
    try:
        for expected in (step_socket.END, step_socket.MESSAGE):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(30)
            conn.connect(str(tmp_path / "steps"))
            with conn:
                step_socket.send_frame(conn, step_socket.MESSAGE, b"")  # an empty StepRequest
                kind, payload = step_socket.read_frame(conn)
                assert kind == expected
                if kind == step_socket.END:
                    assert (
                        "the step stream failed: a bug"
                        in pb.StepStreamEnd.FromString(payload).message
                    )
    finally:
        listener.close()


def test_a_step_socket_path_that_is_not_a_socket_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    cmd = [sys.executable, "-m", "mtpd", "worker", "--listen", f"unix:{tmp_path / 'w.sock'}"]
    out = subprocess.run(
        [*cmd, "--step-socket", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and f"--step-socket {path}" in out.stderr
    assert path.read_text() == "mine"


def test_a_send_never_waits_for_the_worker_to_read(tmp_path):
    """Frames beyond the socket's buffer go out in order from a writer thread, while the
    caller goes on (the pipeline sends under a lock reply readers can be waiting for)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "steps"))
    listener.listen(1)
    with listener:
        steps = _SocketSteps(tmp_path / "steps")
        conn, _ = listener.accept()
        payloads = [bytes([i]) * 300_000 for i in range(20)]  # 6 MB: far past the buffer
        sender = threading.Thread(target=lambda: [steps.send(p) for p in payloads])
        sender.start()
        sender.join(timeout=30)
        assert not sender.is_alive()  # nothing was read yet
        with conn:
            conn.settimeout(30)
            assert [step_socket.read_frame(conn)[1] for _ in payloads] == payloads
        steps.end()
        steps.conn.close()
