"""Remote workers joining the daemon (`mtpd worker --join HOST:PORT`).

Only with `--join-listen`: the daemon then serves WorkerRegistry on that address,
joins and the data plane's rendezvous (daemon/rendezvous.py) alike, behind the shared
token (and TLS, given certificates). A join also needs the same mtpd version and the
same model. The data plane itself (gloo, NCCL) authenticates no one: it belongs on a
private network.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from mtpd import __version__
from mtpd.daemon.rendezvous import RendezvousStore
from mtpd.daemon.worker_link import WorkerError
from mtpd.rpc import CONTROL_MESSAGE_LIMIT, TokenGate, WorkerTLS, listen_worker_plane
from mtpd.v1 import worker_pb2 as pb
from mtpd.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("mtpd.daemon")


class WorkerRegistry(pb_grpc.WorkerRegistryServicer):
    def __init__(self, expected: int, token: str, model_identity: str) -> None:
        self.expected, self.token, self.model_identity = expected, token, model_identity
        # One slot per rank, filled in join order; a failed worker's slot opens again
        # for its replacement.
        self.addresses: list[str | None] = [None] * expected
        self._cond = threading.Condition()
        self.rendezvous = RendezvousStore()  # where their process groups meet

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        # The token was checked before the request was parsed (serve_registry's gate).
        if request.version != __version__:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version mismatch: the worker runs mtpd {request.version}, "
                f"the daemon {__version__}",
            )
        if request.model_identity != self.model_identity:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "different model: the worker's --model is not the model the daemon serves "
                f"(identity {request.model_identity[:12]} != {self.model_identity[:12]})",
            )
        with self._cond:
            if None not in self.addresses:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the pipeline already has its {self.expected} workers",
                )
            if request.address in self.addresses:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS, f"{request.address} has already joined"
                )
            rank = self.addresses.index(None)
            self.addresses[rank] = request.address
            self._cond.notify_all()
            joined = self.expected - self.addresses.count(None)
        log.info("worker at %s joined as rank %d", request.address, rank)
        return pb.JoinReply(workers_joined=joined, workers_expected=self.expected)

    def Store(self, request: pb.StoreRequest, context: grpc.ServicerContext) -> pb.StoreReply:
        return self.rendezvous.serve(request, context)

    def reopen(self, rank: int) -> None:
        """Let a replacement for worker `rank` join."""
        with self._cond:
            self.addresses[rank] = None

    def wait_for_all(self, timeout: float) -> list[str]:
        with self._cond:
            if not self._cond.wait_for(lambda: None not in self.addresses, timeout):
                missing = self.addresses.count(None)
                raise WorkerError(
                    f"{missing} of {self.expected} remote workers did not join within "
                    f"{timeout:.0f} s"
                )
            return [a for a in self.addresses if a is not None]


def serve_registry(listen: str, registry: WorkerRegistry, tls: WorkerTLS | None) -> grpc.Server:
    server = grpc.server(
        # A rendezvous holds a call of every worker waiting for the others' keys.
        futures.ThreadPoolExecutor(max_workers=2 * registry.expected + 4),
        interceptors=[TokenGate(registry.token)],
        options=[("grpc.max_receive_message_length", CONTROL_MESSAGE_LIMIT)],
    )
    pb_grpc.add_WorkerRegistryServicer_to_server(registry, server)
    if listen_worker_plane(server, listen, tls) == 0:
        raise WorkerError(f"cannot listen for workers on {listen!r}")
    server.start()
    return server
