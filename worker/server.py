"""`mtpd worker`: one process serving one pipeline stage over gRPC.

The worker starts bare (so the daemon can ask for its free memory before splitting
layers), loads its shard on `Load`, then serves the step stream until the daemon goes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import grpc
import psutil
import torch

from mtpd import __version__
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
            reply = self._load(request)
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
        if self.stage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no shard loaded")
        if not self._step_lock.acquire(blocking=False):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a step stream is already open")
        try:
            for request in request_iterator:
                try:
                    yield self.stage.run(request)
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
                    context.abort(code, f"step {request.step_id}: {e}")
        finally:
            self._step_lock.release()

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
            if self.stage.link is not None:  # a survivor whose steps never failed
                self.stage.link.close()
            self.stage.reset(self._new_link(request.rendezvous))
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
) -> NoReturn:
    """Serve one stage until SIGTERM. Local workers are started by the daemon; a remote
    one (`join`) needs the shared `token` and its own copy of the `model`."""
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
    pb_grpc.add_WorkerServicer_to_server(WorkerService(dev, model, token, tls), server)
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
    # Python's teardown of torch takes a quarter of a second and frees nothing that the
    # OS does not, while the daemon (and `mtpd run`) waits for this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
