"""A remote worker's side of the data-plane rendezvous: torch.distributed's Store API
over the daemon's registry (mtpd.daemon.rendezvous), with the worker token and the
worker plane's TLS. gloo and NCCL meet through it as through a TCPStore."""

from __future__ import annotations

from datetime import timedelta

import grpc
import torch.distributed as dist

from mtpd.rpc import WorkerTLS, bearer_metadata, worker_plane_channel
from mtpd.v1 import worker_pb2 as pb
from mtpd.v1 import worker_pb2_grpc as pb_grpc

Op = pb.StoreRequest


class RegistryStore(dist.Store):
    def __init__(
        self, address: str, token: str | None, tls: WorkerTLS | None, timeout: timedelta
    ) -> None:
        super().__init__()
        self._channel = worker_plane_channel(address, tls)
        self._stub = pb_grpc.WorkerRegistryStub(self._channel)
        self._metadata = bearer_metadata(token)
        self._timeout = timeout

    def _call(self, request: pb.StoreRequest, wait: timedelta | None = None) -> pb.StoreReply:
        seconds = (wait or self._timeout).total_seconds()
        request.timeout_s = seconds
        try:
            return self._stub.Store(request, metadata=self._metadata, timeout=seconds + 30)
        except grpc.RpcError as e:  # torch turns these into its own errors
            raise RuntimeError(f"rendezvous store: {e.code().name}: {e.details()}") from None

    def set(self, key: str, value: bytes | str) -> None:
        self._call(pb.StoreRequest(op=Op.OP_SET, keys=[key], value=_as_bytes(value)))

    def get(self, key: str) -> bytes:
        return self._call(pb.StoreRequest(op=Op.OP_GET, keys=[key])).value

    def add(self, key: str, value: int) -> int:
        return self._call(pb.StoreRequest(op=Op.OP_ADD, keys=[key], delta=value)).number

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        request = pb.StoreRequest(
            op=Op.OP_COMPARE_SET, keys=[key], expected=_as_bytes(expected), value=_as_bytes(desired)
        )
        return self._call(request).value

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._call(pb.StoreRequest(op=Op.OP_WAIT, keys=keys), timeout)

    def check(self, keys: list[str]) -> bool:
        return self._call(pb.StoreRequest(op=Op.OP_CHECK, keys=keys)).ok

    def delete_key(self, key: str) -> bool:
        return self._call(pb.StoreRequest(op=Op.OP_DELETE, keys=[key])).ok

    def num_keys(self) -> int:
        return self._call(pb.StoreRequest(op=Op.OP_NUM_KEYS)).number

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
