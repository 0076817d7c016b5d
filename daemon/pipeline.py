"""The chain of workers: send steps through them, and restart one that fails (they are
started and loaded by `daemon/launch.py`).

A step goes to every worker's stream in the same order (each worker needs the
sequence ids and cache lengths); activations then flow worker to worker over
torch.distributed. With the gRPC-bytes transport the daemon instead hands each
stage's activations to the next stage itself. Either way a step completes when every
stage has answered, and the tail's answer carries the sampled tokens.

Over 400 lines on purpose: stepping and recovery share one table of steps in flight
and its lock (a failure fails or replays exactly the steps out, a restart reopens the
streams new steps go to); split in two, each half would reach into the other's state.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mtpd.daemon.launch import Launched, LocalWorkers, await_workers, check_same_taps, launch
from mtpd.daemon.worker_link import LocalWorker, WorkerError, WorkerLink
from mtpd.model.errors import InputError
from mtpd.rpc import WorkerTLS
from mtpd.v1 import worker_pb2 as pb

log = logging.getLogger("mtpd.daemon")

EXIT_NOTICE_S = 0.3  # how long a failure report waits for a dying worker to be reaped
# How long a bystander's report (it lost a neighbour) waits for the failed worker's own:
# a worker that raised closes its data-plane link before its step stream ends.
BYSTANDER_NOTICE_S = 5.0


@dataclass
class PipelineConfig:
    # The checkpoint and its layer count: `Coordinator.start` fills them in from the model
    # it resolves (with model_identity, load_mtp and state_snapshots).
    model: str = ""
    num_layers: int = 0
    workers: int | None = None  # default: one per visible GPU, one without GPUs
    device: str | None = None  # "cpu" or "cuda"; default cuda when visible
    split: str | None = None  # "auto", "10,20", or None for even
    dtype: str = "float32"
    quant: str = "none"  # weight-only quantization: none, int8, int4
    kv_cache: str = "auto"  # the KV cache's element type: auto, float16, int8
    # Decode and verification steps replayed as CUDA graphs; None: where they apply
    # (StepGraphs.wanted, decided by each worker for its own device and layers).
    cuda_graphs: bool | None = None
    max_seqs: int = 16
    max_context: int = 2048
    cache_memory: int = 0  # bytes per worker; 0 = a share of free memory
    threads: int | None = None  # per CPU worker; default: the cores shared out
    transport: str = "dist"  # "dist" or "grpc"
    mtp_head: str | None = None
    runtime_dir: Path | None = None
    recv_timeout_s: float = 60.0
    # Remote workers: they join at this HOST:PORT (an address they can reach) with the
    # shared token; `workers` of them are awaited instead of starting local ones.
    join_listen: str | None = None
    token: str | None = None
    worker_tls: WorkerTLS | None = None  # mutual TLS with remote workers
    model_identity: str = (
        ""  # what joining workers must match (mtpd.model.checkpoint.model_identity)
    )
    join_timeout_s: float = 300.0
    load_mtp: bool = False  # the tail loads an MTP head (mtp_head, or the checkpoint's own)
    # Prefix caching on a hybrid model: recurrent states each sequence may save.
    state_snapshots: int = 0
    # Supervision: a local worker that dies, or leaves a step unanswered this long, is
    # restarted and every sequence replayed; at most max_restarts times per worker in
    # any restart_window_s, after which requests fail until the window lets it restart.
    step_timeout_s: float = 120.0
    max_restarts: int = 5
    restart_window_s: float = 600.0
    rejoin_timeout_s: float = 300.0  # a remote worker's replacement must join within it


@dataclass
class StepOutcome:
    results: dict[str, pb.SequenceResult]
    timings: list[pb.StepTimings]  # per stage
    submitted_at: float  # time.monotonic()
    completed_at: float
    previous_completed_at: float  # of the step before it on one stage; else 0

    @property
    def duration(self) -> float:
        """What the step took, from the daemon's side: from when the pipeline could
        start it (on one stage, not before the step ahead of it completed: a lookahead
        is submitted while the step it follows runs)."""
        return self.completed_at - max(self.submitted_at, self.previous_completed_at)

    @property
    def cost(self) -> float:
        """What a decode step cost its streams. On one stage, the time since the step
        before it completed: the scheduler sends a decode step as soon as a result
        arrives, so this counts the daemon's turnaround, which a lookahead hides and a
        step after drafts does not. With several stages, `duration`."""
        if self.previous_completed_at:
            return self.completed_at - self.previous_completed_at
        return self.duration


class PipelineRestarting(WorkerError):
    """A worker failed and is being restarted: the step's sequences will be replayed.
    `ran` says whether the step was in the pipeline when the worker failed (it may have
    caused the failure) or was refused because a restart was under way."""

    def __init__(self, reason: str, ran: bool) -> None:
        super().__init__(reason)
        self.ran = ran


class StepRefusedError(InputError):
    """Every worker refused the step (for example, the KV cache is full)."""


@dataclass
class _Pending:
    request: pb.StepRequest
    future: Future[StepOutcome]
    submitted_at: float
    replies: list[pb.StepReply | None] = field(default_factory=list)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, launched: Launched) -> None:
        self.cfg, self.links, self.stages = cfg, launched.links, launched.stages
        self._local, self._remote_side = launched.local, launched.remote_side
        self.processes = launched.local.processes if launched.local is not None else []
        self._load_requests = launched.requests
        stages, links = self.stages, self.links
        self.max_seqs = min(s.load.max_seqs for s in stages)
        self.max_context = min(s.load.max_context for s in stages)
        self.mtp_head = stages[-1].load.mtp_head  # "" when the tail has none
        # Prompt chunks keep to multiples of this (a hybrid model's recurrent state).
        self.state_block = max(s.load.state_block for s in stages)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._last_completed_at = 0.0
        self.failure: str | None = None
        # Recovery: while `recovering`, steps are refused with PipelineRestarting; each
        # completed recovery adds one to `epoch` (before `recovering` clears), telling the
        # scheduler that every cache is empty and its sequences must be replayed. While a
        # worker waits for its restart budget, `failure` says so and steps fail.
        self.recovering = False
        self.epoch = 0
        self.restarts = [0] * len(links)  # since the start, for stats
        self._restarted_at: list[deque[float]] = [deque() for _ in links]  # in the window
        # Workers that failed themselves since the last pick of one to restart, in order.
        self._blamed: list[int] = []
        self._listeners: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self._open_steps()
        threading.Thread(target=self._watch_steps, daemon=True, name="step-watch").start()

    def _open_steps(self) -> None:
        for rank, link in enumerate(self.links):
            try:
                link.open_steps(
                    lambda reply, rank=rank: self._on_reply(rank, reply),
                    lambda message, bystander, rank=rank: self._on_stream_error(
                        rank, message, bystander
                    ),
                )
            except WorkerError:
                with self._lock:  # a survivor that cannot be reached is the next to restart
                    self._blamed.append(rank)
                raise

    @property
    def failed_for_good(self) -> bool:
        """A worker failed and --max-restarts 0 says it is never restarted."""
        return self.failure is not None and self.cfg.max_restarts == 0

    def add_listener(self, listener: Callable[[], None]) -> None:
        """`listener` is called when a recovery ends (or fails)."""
        self._listeners.append(listener)

    @property
    def num_stages(self) -> int:
        return len(self.links)

    @property
    def daemon_core_free(self) -> bool:
        """Whether the daemon can work while a step computes without taking a core from
        it: the workers compute on GPUs or on other hosts, or their CPU threads leave a
        core of this host free. (With both of 2 cores in the worker, the daemon's
        turnaround mostly moved into the step: one-stream rounds with a lookahead
        scattered 0.96-1.06x, 1.01x on average; with a core free, 1.03-1.07x a run.)"""
        local = self._local
        if local is None:
            return True
        cpu_workers = sum(1 for d in local.devices if d == "cpu")
        return local.threads * cpu_workers < (os.cpu_count() or 1)

    # -- starting -----------------------------------------------------------------

    @classmethod
    def start(
        cls,
        cfg: PipelineConfig,
        on_status: Callable[[str], None] | None = None,
        local: LocalWorkers | None = None,
    ) -> Pipeline:
        """Start (or await) the workers and load every shard (`daemon/launch.py`);
        `local` are workers already started for `cfg` (which this pipeline then owns),
        `on_status` hears what is happening, for systemd's STATUS line."""
        return cls(cfg, launch(cfg, on_status or (lambda _: None), local))

    # -- stepping -----------------------------------------------------------------

    def submit(
        self,
        sequences: list[pb.SequenceStep],
        release: list[str] | None = None,
        opened: list[pb.SequenceOpen] | None = None,
    ) -> Future[StepOutcome]:
        """Run a step: `opened` carries the settings of the sequences it starts."""
        future: Future[StepOutcome] = Future()
        with self._lock:
            if self.failure is not None:
                future.set_exception(WorkerError(self.failure))
                return future
            if self.recovering:
                future.set_exception(PipelineRestarting("a worker is being restarted", ran=False))
                return future
            request = pb.StepRequest(
                step_id=next(self._ids),
                sequences=sequences,
                release=release or [],
                open=opened or [],
            )
            pending = _Pending(request, future, time.monotonic(), [None] * self.num_stages)
            self._pending[request.step_id] = pending
            # Every stage hears of every step, in one order (a send never blocks: see
            # WorkerLink.send). Relayed activations (gRPC transport) reach later stages
            # from _on_reply instead.
            for link in self.links[:1] if self._relayed(request) else self.links:
                link.send(request)
        return future

    def _relayed(self, request: pb.StepRequest) -> bool:
        """Whether the daemon carries this step's activations from stage to stage."""
        return self.cfg.transport == "grpc" and bool(request.sequences)

    def release(self, seq_ids: list[str]) -> Future[StepOutcome]:
        """Free the sequences' cache slots on every worker (ordered after their steps)."""
        return self.submit([], seq_ids)

    def _on_reply(self, rank: int, reply: pb.StepReply) -> None:
        with self._lock:
            pending = self._pending.get(reply.step_id)
            if pending is None:
                return
            pending.replies[rank] = reply
            relay = self._relayed(pending.request)
            if relay and rank + 1 < self.num_stages and not reply.error:
                forward = pb.StepRequest()
                forward.CopyFrom(pending.request)
                forward.activations.CopyFrom(reply.activations)
                reply.ClearField("activations")
                self.links[rank + 1].send(forward)
            done = all(r is not None for r in pending.replies) or (relay and reply.error)
            if not done:
                return
            del self._pending[reply.step_id]
            completed_at = time.monotonic()
            previous = self._last_completed_at if self.num_stages == 1 else 0.0
            self._last_completed_at = completed_at
        errors = [r.error for r in pending.replies if r is not None and r.error]
        if errors:
            pending.future.set_exception(StepRefusedError(errors[0]))
            return
        tail = pending.replies[-1]
        pending.future.set_result(
            StepOutcome(
                results={r.seq_id: r for r in tail.results},
                timings=[r.timings for r in pending.replies],
                submitted_at=pending.submitted_at,
                completed_at=completed_at,
                previous_completed_at=previous,
            )
        )

    # -- recovering ---------------------------------------------------------------

    def _on_stream_error(self, reporter: int, message: str, bystander: bool = False) -> None:
        """A worker's step stream ended. A `bystander` only lost a neighbour on the data
        plane; the others failed themselves (an exception, a death, a wedge)."""
        with self._lock:
            if self._closed.is_set():
                return
            if self.failure is not None or self.recovering:
                if not bystander and reporter not in self._blamed:  # who caused it
                    self._blamed.append(reporter)
                return
            self._blamed = [] if bystander else [reporter]
            pending, self._pending = list(self._pending.values()), {}
            self.recovering = True
        reason = f"worker {reporter}: {message}"
        for p in pending:
            p.future.set_exception(PipelineRestarting(reason, ran=True))
        wait_s = BYSTANDER_NOTICE_S if bystander else EXIT_NOTICE_S
        threading.Thread(
            target=self._recover, args=(reporter, reason, wait_s), daemon=True, name="recovery"
        ).start()

    def _recover(self, rank: int, reason: str, wait_s: float) -> None:
        """Replace worker `rank`: a new process loads its shard while every other worker
        drops its caches, and all of them form a fresh data-plane group (the survivors
        keep their weights: no reload). A worker out of restart budget waits until its
        oldest restart leaves the window; meanwhile `failure` says why steps fail."""
        while not self._closed.is_set():
            # Picked again on every try: another worker may have died meanwhile.
            rank = self._failed_worker(rank, wait_s)
            wait_s = 0.0
            process = self.processes[rank] if rank < len(self.processes) else None
            why = reason
            if process is not None:
                if exit_note := process.describe_exit():
                    why += f" ({exit_note})"
                if tail := process.log_tail():  # for the operator: never in an API's answer
                    log.warning("worker %d failed; the end of its log:\n%s", rank, tail)
            if (wait := self._budget_wait(rank)) > 0:
                with self._lock:
                    self.failure = (
                        f"worker {rank} failed, and --max-restarts 0 means it is not restarted"
                        if wait == math.inf
                        else f"worker {rank} failed again after {self.cfg.max_restarts} "
                        f"restarts in {self.cfg.restart_window_s:g} s (--max-restarts per "
                        f"--restart-window); it is restarted in {wait:.0f} s"
                    )
                log.error("%s; the last failure: %s", self.failure, why)
                self._tell_listeners()
                if self._closed.wait(None if wait == math.inf else wait):
                    return
                continue  # picked again, and the budget asked again
            self.restarts[rank] += 1
            self._restarted_at[rank].append(time.monotonic())
            log.warning("%s; restarting worker %d (restart %d)", why, rank, self.restarts[rank])
            try:
                self._restart(rank)
            except Exception as e:
                reason = f"restarting worker {rank} failed: {e}"
                log.exception("restarting worker %d failed", rank)
                continue
            log.warning("worker %d restarted; replaying its sequences", rank)
            with self._lock:
                if self._closed.is_set():
                    return
                self.epoch += 1
                self.failure = None
                self.recovering = False
            self._tell_listeners()
            return

    def _budget_wait(self, rank: int) -> float:
        """Seconds until worker `rank` may be restarted again (0: now)."""
        if self.cfg.max_restarts <= 0:
            return math.inf
        times, now = self._restarted_at[rank], time.monotonic()
        while times and now - times[0] >= self.cfg.restart_window_s:
            times.popleft()
        if len(times) < self.cfg.max_restarts:
            return 0.0
        return times[0] + self.cfg.restart_window_s - now

    def _failed_worker(self, reporter: int, wait_s: float = 0.0) -> int:
        """The worker to replace. The first to report may be a bystander (a killed stage
        0 shows first as stage 1's failed receive): a local worker whose process has
        exited goes first, since no group can form while it is gone, then one that failed
        itself, then the reporter. `wait_s` gives a dying process time to be reaped (its
        sockets close before its exit shows) and the one that failed time to report."""
        deadline = time.monotonic() + wait_s
        while True:
            for r, process in enumerate(self.processes):
                if process.describe_exit() is not None:
                    return r
            with self._lock:
                blamed = self._blamed[0] if self._blamed else None
                self._blamed = []  # reports after this pick are about what happens next
            if blamed is not None:
                return blamed
            if time.monotonic() >= deadline:
                return reporter
            time.sleep(0.01)

    def _restart(self, rank: int) -> None:
        remote = self._remote_side
        if remote is None:
            self.processes[rank].kill()  # a wedged one too; its sockets close at once
        else:
            remote.registry.reopen(rank)
        for link in self.links:
            link.close_steps()
        self.links[rank].close()
        if remote is None:
            local = self._local
            device = self.stages[rank].device
            self.processes[rank] = LocalWorker(rank, local.runtime_dir, device, local.threads)
            self.links[rank] = self.processes[rank].link(self.cfg.transport)
            (info,) = await_workers([self.links[rank]], [self.processes[rank]])
            rendezvous = str(local.runtime_dir / f"rendezvous-{rank}-{self.restarts[rank]}")
        else:  # its host restarts it (systemd), and it joins again
            log.warning(
                "waiting up to %.0f s for worker %d to rejoin", self.cfg.rejoin_timeout_s, rank
            )
            address = remote.registry.wait_for_all(self.cfg.rejoin_timeout_s)[rank]
            self.links[rank] = WorkerLink(address, self.cfg.token, self.cfg.worker_tls)
            (info,) = await_workers([self.links[rank]], [])
            rendezvous = f"{remote.rendezvous}/{rank}-{self.restarts[rank]}"
        request = pb.LoadRequest()
        request.CopyFrom(self._load_requests[rank])
        request.rendezvous = rendezvous

        def rejoin(r: int) -> pb.LoadReply | None:
            if r == rank:
                return self.links[r].load(request)
            self.links[r].reset(rendezvous)
            return None

        with ThreadPoolExecutor(self.num_stages) as pool:
            load = list(pool.map(rejoin, range(self.num_stages)))[rank]
        if load.max_seqs < self.max_seqs:  # it would refuse sequences the others run
            raise WorkerError(
                f"worker {rank} came back with {load.max_seqs} cache slots, fewer than the "
                f"{self.max_seqs} the pipeline schedules (less free memory than at start?)"
            )
        check_same_taps([load if s.rank == rank else s.load for s in self.stages])
        self.stages[rank] = dataclasses.replace(self.stages[rank], pid=info.pid, load=load)
        self._open_steps()

    def _tell_listeners(self) -> None:
        for listener in self._listeners:
            listener()

    def _watch_steps(self) -> None:
        """A worker that leaves a step unanswered past the step timeout is wedged."""
        while not self._closed.wait(min(1.0, self.cfg.step_timeout_s / 4)):
            with self._lock:
                late = [
                    p
                    for p in self._pending.values()
                    if time.monotonic() - p.submitted_at > self.cfg.step_timeout_s
                ]
                if not late or self.recovering or self.failure is not None:
                    continue
                oldest = min(late, key=lambda p: p.submitted_at)
                rank = next(r for r, reply in enumerate(oldest.replies) if reply is None)
            self._on_stream_error(
                rank, f"no reply to step {oldest.request.step_id} in {self.cfg.step_timeout_s} s"
            )

    # -- inspecting and stopping ----------------------------------------------------

    def worker_stats(self) -> list[pb.WorkerStats]:
        return [link.stats() for link in self.links]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self.failure = self.failure or "pipeline closed"
        for link in self.links:
            link.close()
        if self._local is not None:
            self._local.stop()
        if self._remote_side is not None:
            self._remote_side.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
