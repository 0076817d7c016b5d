"""The remote workers' data-plane rendezvous, served by the daemon's registry behind its
token (and TLS): torch.distributed's store API over gRPC, in place of a TCPStore,
which authenticates no one. The workers' side is mtpd.worker.rendezvous_store."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import grpc

from mtpd.v1 import worker_pb2 as pb

MAX_KEYS = 4096  # the oldest are forgotten past this: earlier rendezvous' keys
MAX_WAIT_S = 600.0


class RendezvousStore:
    """Keys and values, bounded (the keys here; a value by the registry's receive limit,
    mtpd.rpc.CONTROL_MESSAGE_LIMIT), with waits for keys to be set."""

    def __init__(self) -> None:
        self._values: OrderedDict[str, bytes] = OrderedDict()
        self._cond = threading.Condition()

    def serve(self, request: pb.StoreRequest, context: grpc.ServicerContext) -> pb.StoreReply:
        keys = list(request.keys)
        op = request.op
        if op == pb.StoreRequest.OP_NUM_KEYS and keys:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_keys takes no key")
        single = (
            pb.StoreRequest.OP_SET,
            pb.StoreRequest.OP_GET,
            pb.StoreRequest.OP_ADD,
            pb.StoreRequest.OP_COMPARE_SET,
            pb.StoreRequest.OP_DELETE,
        )
        if op in single and len(keys) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this operation takes one key")
        timeout = min(max(request.timeout_s, 0.0), MAX_WAIT_S)
        with self._cond:
            if op == pb.StoreRequest.OP_SET:
                self._set(keys[0], request.value)
                return pb.StoreReply(ok=True)
            if op == pb.StoreRequest.OP_GET:
                if not self._wait(keys, timeout):
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"{keys[0]!r} was not set in time"
                    )
                return pb.StoreReply(value=self._values[keys[0]], ok=True)
            if op == pb.StoreRequest.OP_ADD:
                try:
                    total = int(self._values.get(keys[0], b"0")) + request.delta
                except ValueError:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{keys[0]!r} is no number")
                self._set(keys[0], str(total).encode())
                return pb.StoreReply(number=total, ok=True)
            if op == pb.StoreRequest.OP_COMPARE_SET:
                held = self._values.get(keys[0])
                if (held is None and not request.expected) or held == request.expected:
                    self._set(keys[0], request.value)
                return pb.StoreReply(value=self._values.get(keys[0], request.expected), ok=True)
            if op == pb.StoreRequest.OP_WAIT:
                if not self._wait(keys, timeout):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "keys not set in time")
                return pb.StoreReply(ok=True)
            if op == pb.StoreRequest.OP_CHECK:
                return pb.StoreReply(ok=all(k in self._values for k in keys))
            if op == pb.StoreRequest.OP_DELETE:
                return pb.StoreReply(ok=self._values.pop(keys[0], None) is not None)
            if op == pb.StoreRequest.OP_NUM_KEYS:
                return pb.StoreReply(number=len(self._values), ok=True)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown store operation {op}")

    def _set(self, key: str, value: bytes) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > MAX_KEYS:
            self._values.popitem(last=False)
        self._cond.notify_all()

    def _wait(self, keys: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return self._cond.wait_for(
            lambda: all(k in self._values for k in keys), max(0.0, deadline - time.monotonic())
        )
