"""`mtpd worker`: one process serving one pipeline stage over gRPC.

The worker starts bare (so the daemon can ask for its free memory before splitting
layers), loads its shard on `Load`, then serves the step stream until the daemon goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
import psutil
import torch
from google.protobuf.message import DecodeError

from mtpd import __version__, step_socket
from mtpd.model.checkpoint import model_identity, open_checkpoint, read_config
from mtpd.model.decoder import ShardSpec, shard_tensor_shapes
from mtpd.model.default_model import shipped_head_for
from mtpd.model.errors import InputError
from mtpd.model.linear_state import STATE_BLOCK
from mtpd.model.mtp import read_head_tap_layers
from mtpd.rpc import (
    CHANNEL_OPTIONS,
    CONTROL_MESSAGE_LIMIT,
    TokenGate,
    UnaryRequestLimit,
    WorkerTLS,
    bearer_metadata,
    listen_worker_plane,
    worker_plane_channel,
)
from mtpd.v1 import worker_pb2 as pb
from mtpd.v1 import worker_pb2_grpc as pb_grpc
from mtpd.worker.cuda_graphs import StepGraphs
from mtpd.worker.memory import peak_memory_bytes, tensor_bytes
from mtpd.worker.shard_loading import load_shard
from mtpd.worker.stage import Stage
from mtpd.worker.transport import DTYPES, DistLink, TransportError

log = logging.getLogger("mtpd.worker")

T = TypeVar("T")

# Without --cache-memory the KV cache takes at most this share of the memory left
# after the weights are loaded.
DEFAULT_CACHE_SHARE = 0.5


# Saved recurrent states per sequence slot (each as large as the slot's live state).
MAX_STATE_SNAPSHOTS = 16


def parse_device(name: str) -> torch.device:
    """A device that exists on this machine, or an InputError naming it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"unknown device {name!r}: {e}") from e
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise InputError(f"device {name!r} does not exist: this machine has {count} GPU(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise InputError(f"unsupported device {name!r}: use cpu or cuda[:N]")
    return device


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def cache_slots(wanted: int, bytes_per_slot: int, cache_memory: int, free: int) -> int:
    """How many sequence slots the KV cache gets."""
    budget = int(free * DEFAULT_CACHE_SHARE)
    if cache_memory:
        budget = min(budget, cache_memory)
    slots = min(wanted, budget // bytes_per_slot)
    if slots < 1:
        raise InputError(
            f"KV cache budget of {budget} bytes cannot hold one sequence of "
            f"{bytes_per_slot} bytes: lower max_context or raise --cache-memory"
        )
    return slots


class StepStreamFailed(Exception):
    """Why a step stream ends: gRPC's status code for it, and the message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        device: torch.device,
        model: str | None = None,
        token: str | None = None,
        tls: WorkerTLS | None = None,
    ) -> None:
        self.device = device
        self.token, self.tls = token, tls  # a remote worker's: for the rendezvous store
        self.model = model  # a remote worker's own --model: loaded when Load names none
        self.state = pb.WORKER_STATE_IDLE
        self.stage: Stage | None = None
        self._load_lock = threading.Lock()
        # Loading and every step run on this one thread. An OpenMP team belongs to the
        # thread that starts it, and libgomp spins at a barrier only while the threads of
        # all its teams are at most the cores: steps on a second thread, beside the
        # team Load left, made every barrier sleep (int4 step 3.3 -> 19 ms, two cores).
        self._compute = futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._step_lock = threading.Lock()
        self._link_args: tuple | None = None  # how to make a DistLink again on Reset

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.WorkerInfo:
        return pb.WorkerInfo(
            version=__version__,
            pid=os.getpid(),
            device=str(self.device),
            free_memory_bytes=free_memory(self.device),
            state=self.state,
            threads=torch.get_num_threads(),
        )

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadReply:
        if not self._load_lock.acquire(blocking=False) or self.state != pb.WORKER_STATE_IDLE:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker already has a shard")
        self.state = pb.WORKER_STATE_LOADING
        try:
            reply = self.on_compute(self._load, request)
        except (InputError, TransportError, OSError) as e:
            self.state = pb.WORKER_STATE_FAILED
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.state = pb.WORKER_STATE_READY
        return reply

    def _load(self, req: pb.LoadRequest) -> pb.LoadReply:
        start = time.monotonic()
        if req.dtype not in DTYPES:
            raise InputError(f"unknown dtype {req.dtype!r}: use one of {sorted(DTYPES)}")
        if req.state_snapshots > MAX_STATE_SNAPSHOTS:  # the daemon counts them as asked
            raise InputError(
                f"state_snapshots {req.state_snapshots} above the maximum of {MAX_STATE_SNAPSHOTS}"
            )
        if not 0 <= req.rank < req.world_size:
            raise InputError(f"rank {req.rank} outside a pipeline of {req.world_size} workers")
        model = req.model or self.model
        if not model:
            raise InputError("no model: the Load request names none and --model was not given")
        ckpt = open_checkpoint(model)
        cfg = read_config(ckpt)
        if not 0 <= req.first_layer < req.end_layer <= cfg.num_layers:
            raise InputError(
                f"layer range [{req.first_layer}, {req.end_layer}) is not within the "
                f"model's {cfg.num_layers} layers"
            )
        tail = req.rank == req.world_size - 1
        spec = ShardSpec(req.first_layer, req.end_layer, req.rank == 0, tail)
        dtype = DTYPES[req.dtype]
        head = None
        if req.load_mtp:
            # A worker resolves the shipped head itself: a remote one has its own install.
            head = Path(req.mtp_head) if req.mtp_head else shipped_head_for(Path(model))
        shard, mtp = load_shard(
            ckpt,
            cfg,
            spec,
            dtype,
            req.max_context,
            self.device,
            head if tail else None,
            checkpoint_mtp=tail and req.load_mtp,
            quant=req.quant or "none",
            kv_cache=req.kv_cache or "auto",
        )
        if not tail and head is not None:  # the tail's head may read features of ours
            shard.set_taps(read_head_tap_layers(head, cfg))
        requested = req.cuda_graphs if req.HasField("cuda_graphs") else None
        use_graphs = StepGraphs.wanted(requested, shard, req.quant or "none")
        max_context = shard.stack.max_context
        snapshots = req.state_snapshots
        per_slot = shard.stack.cache_bytes_per_slot(max_context, snapshots)
        budget = req.cache_memory_bytes
        if use_graphs and budget:
            budget = max(1, budget - per_slot)  # the scratch slot is in the budget too
        slots = cache_slots(max(1, req.max_seqs), per_slot, budget, free_memory(self.device))
        cache = shard.new_cache(slots, max_context, scratch_slot=use_graphs, snapshots=snapshots)
        graphs = StepGraphs(shard, cache) if use_graphs else None
        link = None
        if req.world_size > 1 and req.transport == pb.TRANSPORT_DIST:
            timeout = timedelta(milliseconds=req.recv_timeout_ms or 60_000)
            self._link_args = (req.rank, req.world_size, self.device, timeout)
            link = self._new_link(req.rendezvous)
        self.stage = Stage(shard, cache, req.rank, req.world_size, link, mtp, graphs)
        return pb.LoadReply(
            parameter_count=shard.parameter_count,
            tensor_names=sorted(shard_tensor_shapes(cfg, spec)),
            max_seqs=slots,
            max_context=max_context,
            cache_bytes=slots * per_slot,
            hidden_size=cfg.hidden_size,
            weights_fingerprint=shard.fingerprint or "",
            load_seconds=time.monotonic() - start,
            mtp_head=("" if mtp is None else str(head or f"{model} (its own MTP layer)")),
            draft_vocab=0 if mtp is None else mtp.draft_vocab_size,
            cuda_graphs=use_graphs,
            state_block=STATE_BLOCK if cfg.is_hybrid else 0,
            tap_layers=shard.tap_layers,
        )

    def Step(self, request_iterator, context: grpc.ServicerContext):
        try:
            yield from self.serve_steps(request_iterator, on_compute_thread=False)
        except StepStreamFailed as e:
            context.abort(e.code, e.message)

    def serve_steps(
        self, requests: Iterable[pb.StepRequest], on_compute_thread: bool
    ) -> Iterator[pb.StepReply]:
        """A step stream, gRPC's or the step socket's: each request's reply, in order.
        Raises StepStreamFailed when the stream cannot open or a step fails."""
        if self.stage is None:
            raise StepStreamFailed(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        if not self._step_lock.acquire(blocking=False):
            raise StepStreamFailed(
                grpc.StatusCode.FAILED_PRECONDITION, "a step stream is already open"
            )
        try:
            run = self.stage.run
            for request in requests:
                try:
                    yield run(request) if on_compute_thread else self.on_compute(run, request)
                except Exception as e:
                    # The data plane is out of step now. Leaving the group closes our
                    # connections, so neighbours blocked on us fail at once too (not
                    # after the receive timeout); the daemon resets us.
                    self.state = pb.WORKER_STATE_FAILED
                    log.exception("step %d failed", request.step_id)
                    if self.stage.link is not None:
                        self.stage.link.close()
                        self.stage.link = None
                    # ABORTED: only a neighbour failed (the daemon replaces that one).
                    code = (
                        grpc.StatusCode.ABORTED
                        if isinstance(e, TransportError)
                        else grpc.StatusCode.INTERNAL
                    )
                    raise StepStreamFailed(code, f"step {request.step_id}: {e}") from e
        finally:
            self._step_lock.release()

    def _reset(self, rendezvous: str) -> None:
        if self.stage.link is not None:  # a survivor whose steps never failed
            self.stage.link.close()
        self.stage.reset(self._new_link(rendezvous))

    @property
    def step_stream_open(self) -> bool:
        return self._step_lock.locked()

    def on_compute(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the compute thread (see `_compute`), once it is free."""
        return self.submit_compute(fn, *args).result()

    def submit_compute(self, fn: Callable[..., T], *args: object) -> futures.Future[T]:
        return self._compute.submit(fn, *args)

    def _new_link(self, rendezvous: str) -> DistLink | None:
        if self._link_args is None:
            return None
        rank, world_size, device, timeout = self._link_args
        return DistLink(rank, world_size, rendezvous, device, timeout, self.token, self.tls)

    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetReply:
        if self.stage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        # The daemon has ended our step stream; a step still failing on a dead
        # neighbour's socket ends soon.
        if not self._step_lock.acquire(timeout=60):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the step stream did not end")
        try:
            self.on_compute(self._reset, request.rendezvous)
            self.state = pb.WORKER_STATE_READY
        except (TransportError, RuntimeError) as e:
            self.state = pb.WORKER_STATE_FAILED
            context.abort(grpc.StatusCode.INTERNAL, f"reset: {e}")
        finally:
            self._step_lock.release()
        log.info("reset: caches cleared, joined the data plane at %s", request.rendezvous)
        return pb.ResetReply()

    def GetStats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.WorkerStats:
        if self.stage is None:
            return pb.WorkerStats()
        stage, st = self.stage, self.stage.stats
        drafter = stage.drafter
        return pb.WorkerStats(
            steps=st.steps,
            tokens=st.tokens,
            active_sequences=stage.active_sequences,
            max_seqs=stage.cache.max_seqs,
            compute_s=st.compute_s,
            recv_wait_s=st.recv_wait_s,
            send_s=st.send_s,
            weight_bytes=tensor_bytes(stage.shard),
            mtp_bytes=0
            if drafter is None
            else tensor_bytes(drafter.head, shared_with=stage.shard) + drafter.cache.nbytes,
            kv_cache_bytes=stage.cache.nbytes,
            peak_memory_bytes=peak_memory_bytes(stage.shard.device),
        )


def listen_step_socket(service: WorkerService, path: str) -> socket.socket:
    """Serve the step stream on a unix socket at `path` as well, one stream at a time as
    over gRPC (a connection while one is open is told so and closed): the local daemon's
    way in, without gRPC's cost per message. Returns the listener."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a crashed predecessor's
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)  # fails on anything else there, which it leaves alone
        os.chmod(path, 0o600)
        listener.listen(4)
    except OSError as e:
        listener.close()
        raise InputError(f"--step-socket {path}: {e}") from None

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as e:  # out of descriptors, say: the daemon connects again
                log.error("step socket: accept failed: %s", e)
                time.sleep(0.1)
                continue
            if service.step_stream_open:
                _end_stream(conn, pb.StepStreamEnd(message="a step stream is already open"))
                conn.close()
                continue
            service.submit_compute(_serve_step_socket, service, conn)

    threading.Thread(target=accept, daemon=True, name="step-socket").start()
    return listener


def _serve_step_socket(service: WorkerService, conn: socket.socket) -> None:
    """One step stream, on the compute thread; never raises (a failure ends the stream,
    and the worker keeps accepting)."""

    def requests() -> Iterator[pb.StepRequest]:
        while (frame := step_socket.read_frame(conn, step_socket.REQUEST_LIMIT)) is not None:
            kind, payload = frame
            if kind != step_socket.MESSAGE:
                raise step_socket.FrameError("the daemon sent a frame of kind END")
            yield pb.StepRequest.FromString(payload)

    with conn:
        try:
            with contextlib.closing(service.serve_steps(requests(), on_compute_thread=True)) as out:
                for reply in out:
                    step_socket.send_frame(conn, step_socket.MESSAGE, reply.SerializeToString())
        except StepStreamFailed as e:
            end = pb.StepStreamEnd(message=e.message, bystander=e.code == grpc.StatusCode.ABORTED)
            _end_stream(conn, end)
        except (step_socket.FrameError, DecodeError) as e:
            log.error("step socket: a malformed frame from the daemon: %s", e)
            _end_stream(conn, pb.StepStreamEnd(message=f"a malformed step frame: {e}"))
        except OSError as e:  # the daemon went; it opens a new stream if it comes back
            log.info("step socket: the stream ended: %s", e)
        except Exception as e:  # a bug: the stream ends, the worker stays reachable
            log.exception("step socket: the stream failed")
            _end_stream(conn, pb.StepStreamEnd(message=f"the step stream failed: {e}"))


def _end_stream(conn: socket.socket, end: pb.StepStreamEnd) -> None:
    with contextlib.suppress(OSError):
        step_socket.send_frame(conn, step_socket.END, end.SerializeToString())


def _exit_with_parent(parent_pid: int) -> None:
    """A local worker must not outlive its daemon (it would hold a GPU or cores)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _join(join: str, token: str, model: str, advertise: str, tls: WorkerTLS | None) -> None:
    """Announce this worker to the daemon at `join`; refused joins end the worker."""
    ckpt = open_checkpoint(model)
    identity = model_identity(ckpt, read_config(ckpt))
    with worker_plane_channel(join, tls) as channel:
        try:
            reply = pb_grpc.WorkerRegistryStub(channel).Join(
                pb.JoinRequest(version=__version__, model_identity=identity, address=advertise),
                metadata=bearer_metadata(token),
                timeout=60,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            raise InputError(f"the daemon at {join} refused this worker: {e.details()}") from None
    log.info("joined %s as worker %d of %d", join, reply.workers_joined, reply.workers_expected)


def serve(
    listen: str,
    device: str,
    threads: int | None,
    parent_pid: int | None = None,
    join: str | None = None,
    token: str | None = None,
    model: str | None = None,
    advertise: str | None = None,
    tls: WorkerTLS | None = None,
    step_socket_path: str | None = None,
) -> NoReturn:
    """Serve one stage until SIGTERM. Local workers are started by the daemon (with a
    `step_socket_path` for their step stream); a remote one (`join`) needs the shared
    `token` and its own copy of the `model`."""
    dev = parse_device(device)
    if join and not (token and model):
        raise InputError("--join needs --token-file and --model")
    if threads:
        torch.set_num_threads(threads)
    if parent_pid:
        _exit_with_parent(parent_pid)
    # A remote worker's calls need the shared token, checked before a request is read.
    gate = [TokenGate(token)] if token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[*gate, UnaryRequestLimit(CONTROL_MESSAGE_LIMIT)],
        options=CHANNEL_OPTIONS,
    )
    service = WorkerService(dev, model, token, tls)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    # Before gRPC answers: the daemon connects once we are loaded.
    steps = listen_step_socket(service, step_socket_path) if step_socket_path else None
    if listen_worker_plane(server, listen, tls) == 0:
        raise InputError(f"cannot listen on {listen!r}")
    server.start()
    try:
        if join:
            _join(join, token, model, advertise or listen, tls)
    except BaseException:
        server.stop(None)
        raise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("worker %d serving on %s (%s)", os.getpid(), listen, dev)
    stop.wait()
    server.stop(grace=1).wait()
    if steps is not None:
        steps.close()
        with contextlib.suppress(OSError):
            os.unlink(step_socket_path)
    # Python's teardown of torch takes a quarter of a second and frees nothing that the
    # OS does not, while the daemon (and `mtpd run`) waits for this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
