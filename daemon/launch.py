"""Where a pipeline's workers come from: local worker processes on the devices asked for
(`LocalWorkers`), or remote ones that join (`RemoteSide`); then each is given its layers
and loads them (`launch`). The `Pipeline` (daemon/pipeline.py) sends steps through
what this starts, and restarts a worker that fails."""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from mtpd import __version__
from mtpd.daemon.registry import WorkerRegistry, serve_registry
from mtpd.daemon.split import check_worker_count, layer_ranges, parse_split
from mtpd.daemon.worker_link import LocalWorker, WorkerError, WorkerLink
from mtpd.model.errors import InputError
from mtpd.v1 import worker_pb2 as pb

if TYPE_CHECKING:
    from mtpd.daemon.pipeline import PipelineConfig

log = logging.getLogger("mtpd.daemon")

START_TIMEOUT_S = 120.0


@dataclass
class StageInfo:
    rank: int
    first_layer: int
    end_layer: int
    device: str
    pid: int
    load: pb.LoadReply


@dataclass
class Launched:
    """Workers started (or joined) and loaded: what a `Pipeline` runs on."""

    links: list[WorkerLink]
    stages: list[StageInfo]
    local: LocalWorkers | None
    remote_side: RemoteSide | None
    requests: list[pb.LoadRequest]  # each stage's, for loading a replacement


# Device nodes that CUDA (and ROCm, behind torch.cuda) needs: on a machine with none of
# them torch would count 0 GPUs, so the daemon need not import torch to learn that.
_GPU_DEVICE_NODES = ("/dev/nvidia*", "/dev/nvhost*", "/dev/dxg", "/dev/kfd")


def _gpu_count(asked_for_cuda: bool) -> int:
    """Asked for CUDA, torch is asked whatever the device nodes look like."""
    if not asked_for_cuda and not any(glob.glob(pattern) for pattern in _GPU_DEVICE_NODES):
        return 0
    import torch  # the daemon only asks how many GPUs there are

    return torch.cuda.device_count()


def _resolve_devices(device: str | None, workers: int | None, transport: str) -> list[str]:
    if device not in (None, "cpu", "cuda"):
        raise InputError(f"--device {device!r}: use cpu or cuda")
    if workers is not None:
        check_worker_count(workers)
    gpus = 0 if device == "cpu" else _gpu_count(device == "cuda")
    kind = device or ("cuda" if gpus else "cpu")
    if kind == "cpu":
        return ["cpu"] * (workers if workers is not None else 1)
    if gpus == 0:
        raise InputError("--device cuda, but this machine has 0 GPU(s) visible")
    n = workers if workers is not None else gpus
    if n > gpus and transport == "grpc":
        # Activations relayed as bytes: several workers may share a GPU (a test setup).
        return [f"cuda:{i % gpus}" for i in range(n)]
    if n > gpus:
        raise InputError(
            f"--device cuda with {n} workers, but this machine has {gpus} GPU(s) "
            f"(one worker per GPU: NCCL cannot pair two processes on one device; "
            "--transport grpc can)"
        )
    return [f"cuda:{i}" for i in range(n)]


@dataclass
class LocalWorkers:
    """Worker processes on this host, in a private runtime directory (their sockets,
    logs and rendezvous file). They can be started before the model is read: a worker
    takes about a second to import torch, which the daemon spends reading the model."""

    devices: list[str]
    threads: int  # per worker
    runtime_dir: Path
    owns_runtime_dir: bool
    processes: list[LocalWorker]

    @classmethod
    def start(cls, cfg: PipelineConfig) -> LocalWorkers:
        """The workers `cfg` asks for (its device, workers, transport, threads and
        runtime directory); the model need not be known yet."""
        check_transport(cfg.transport)
        if cfg.threads is not None and cfg.threads < 1:
            raise InputError(f"--threads must be >= 1, got {cfg.threads}")
        devices = _resolve_devices(cfg.device, cfg.workers, cfg.transport)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // len(devices))
        owns = cfg.runtime_dir is None
        runtime_dir = Path(tempfile.mkdtemp(prefix="mtpd-")) if owns else cfg.runtime_dir
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        local = cls(devices, threads, runtime_dir, owns, [])
        try:
            for i, dev in enumerate(devices):
                local.processes.append(LocalWorker(i, runtime_dir, dev, threads))
        except BaseException:
            local.stop()
            raise
        return local

    def stop(self) -> None:
        for p in self.processes:
            p.stop()
        if self.owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def check_transport(transport: str) -> None:
    if transport not in ("dist", "grpc"):
        raise InputError(f"--transport {transport!r}: use dist or grpc")


def launch(cfg: PipelineConfig, say: Callable[[str], None], local: LocalWorkers | None) -> Launched:
    """Start (or await) the workers and load every shard; `local` are workers already
    started for `cfg`, stopped here if anything fails."""
    links: list[WorkerLink] = []
    remote_side: RemoteSide | None = None
    try:
        if cfg.max_restarts < 0 or not 0 < cfg.restart_window_s < math.inf:
            raise InputError("--max-restarts must be >= 0 and --restart-window a finite s > 0")
        if cfg.join_listen is not None:
            if local is not None:
                raise ValueError("local workers were started for a pipeline of remote ones")
            check_transport(cfg.transport)
            if not cfg.token:
                raise InputError("remote workers (--join-listen) need a --token-file")
            if not cfg.model_identity:
                raise ValueError("PipelineConfig.model_identity is needed for remote workers")
            n = cfg.workers if cfg.workers is not None else 1
        else:
            if local is None:
                local = LocalWorkers.start(cfg)
            n = len(local.processes)
            if cfg.cuda_graphs and local.devices[0] == "cpu":
                raise InputError("--cuda-graphs needs --device cuda")
        split = None if cfg.split in (None, "auto") else parse_split(cfg.split)
        if cfg.split != "auto":  # refuse a bad layout before any remote worker joins
            layer_ranges(cfg.num_layers, n, split)
        if local is None:
            say(f"waiting for {n} remote worker(s) to join at {cfg.join_listen}")
            remote_side = RemoteSide.open(cfg, n)
            links = [WorkerLink(a, cfg.token, cfg.worker_tls) for a in remote_side.addresses]
            rendezvous = remote_side.rendezvous
        else:
            say(f"starting {n} worker(s) on {', '.join(local.devices)}")
            links = [p.link(cfg.transport) for p in local.processes]
            # Local workers meet through a file only this user can read: no port.
            path = local.runtime_dir / "rendezvous"
            path.unlink(missing_ok=True)
            rendezvous = str(path)
        processes = local.processes if local is not None else []
        infos = await_workers(links, processes)
        free = [i.free_memory_bytes for i in infos] if cfg.split == "auto" else None
        ranges = layer_ranges(cfg.num_layers, n, split, free)
        cache_memory = cfg.cache_memory
        if not cache_memory and local is not None and local.devices[0] == "cpu":
            # Local CPU workers share one memory: each takes its share of the half
            # a lone worker would take.
            cache_memory = min(i.free_memory_bytes for i in infos) // (2 * n)
        requests = [
            pb.LoadRequest(
                model="" if local is None else cfg.model,
                first_layer=first,
                end_layer=end,
                dtype=cfg.dtype,
                quant=cfg.quant,
                kv_cache=cfg.kv_cache,
                cuda_graphs=cfg.cuda_graphs,
                max_seqs=cfg.max_seqs,
                max_context=cfg.max_context,
                cache_memory_bytes=cache_memory,
                mtp_head=cfg.mtp_head or "",
                rank=rank,
                world_size=n,
                transport=pb.TRANSPORT_DIST if cfg.transport == "dist" else pb.TRANSPORT_GRPC,
                rendezvous=rendezvous,
                recv_timeout_ms=int(cfg.recv_timeout_s * 1000),
                load_mtp=cfg.load_mtp,
                state_snapshots=cfg.state_snapshots,
            )
            for rank, (first, end) in enumerate(ranges)
        ]
        say(
            "loading "
            + ", ".join(f"layers {a}-{b - 1} on worker {i}" for i, (a, b) in enumerate(ranges))
        )
        loads = load_all(links, processes, requests)
        check_same_taps(loads)
        stages = [
            StageInfo(rank, first, end, infos[rank].device, infos[rank].pid, loads[rank])
            for rank, (first, end) in enumerate(ranges)
        ]
        return Launched(links, stages, local, remote_side, requests)
    except BaseException:
        for link in links:
            link.close()
        if local is not None:
            local.stop()
        if remote_side is not None:
            remote_side.close()
        raise


@dataclass
class RemoteSide:
    """What the daemon opens for remote workers: the registry they join through, which
    is also where their process group meets (its rendezvous store)."""

    server: grpc.Server
    registry: WorkerRegistry
    addresses: list[str]
    rendezvous: str

    @classmethod
    def open(cls, cfg: PipelineConfig, expected: int) -> RemoteSide:
        host = cfg.join_listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]", "::"):
            raise InputError(
                f"--join-listen {cfg.join_listen!r}: name the address workers reach this "
                f"host at (it is also where they meet for the data plane)"
            )
        if cfg.worker_tls is None:
            log.warning(
                "remote workers without TLS (--worker-tls-*): the token and the steps "
                "travel in the clear"
            )
        registry = WorkerRegistry(expected, cfg.token, cfg.model_identity)
        server = serve_registry(cfg.join_listen, registry, cfg.worker_tls)
        try:
            addresses = registry.wait_for_all(cfg.join_timeout_s)
        except BaseException:
            server.stop(None)
            raise
        return cls(server, registry, addresses, f"mtpd://{cfg.join_listen}")

    def close(self) -> None:
        self.server.stop(None)


def await_workers(links: list[WorkerLink], processes: list[LocalWorker]) -> list[pb.WorkerInfo]:
    infos = []
    deadline = time.monotonic() + START_TIMEOUT_S
    for i, link in enumerate(links):
        proc = processes[i] if processes else None
        while True:
            if proc is not None and (why := proc.describe_exit(with_log=True)) is not None:
                raise WorkerError(why)
            try:
                info = link.info(timeout=1.0)
                break
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise WorkerError(f"worker {i} did not start: {e.details()}") from e
        if info.version != __version__:
            raise WorkerError(f"worker {i} runs mtpd {info.version}, the daemon {__version__}")
        infos.append(info)
    return infos


def check_same_taps(loads: list[pb.LoadReply]) -> None:
    """Every stage carries the trunk features the tail's head reads, or the activations
    they pass on differ in width: the MTP head file each worker read must agree."""
    taps = [list(load.tap_layers) for load in loads]
    if any(t != taps[-1] for t in taps):
        raise WorkerError(
            f"the workers' MTP heads tap different trunk layers ({taps}, by rank): give "
            f"each the same head file (--mtp-head), or the same mtpd install"
        )


def load_all(
    links: list[WorkerLink], processes: list[LocalWorker], requests: list[pb.LoadRequest]
) -> list[pb.LoadReply]:
    """Load every shard at once: the data plane forms only when all ranks join."""

    def load(i: int) -> pb.LoadReply:
        try:
            return links[i].load(requests[i])
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InputError(f"worker {i}: {e.details()}") from None
            why = processes[i].describe_exit(with_log=True) if i < len(processes) else None
            raise WorkerError(f"worker {i} failed to load: {why or e.details()}") from None

    pool = ThreadPoolExecutor(len(links))
    try:
        # The first failure is reported at once; the others would wait for the
        # rendezvous until stopped.
        futures = [pool.submit(load, i) for i in range(len(links))]
        for f in as_completed(futures):
            f.result()
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
