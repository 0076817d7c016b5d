"""Moving hidden states between neighbouring pipeline stages.

`DistLink` uses torch.distributed point-to-point (NCCL between GPUs, gloo on CPU);
`encode`/`decode` turn a tensor into the gRPC-bytes form (msgpack header + raw bytes)
for the transport that relays activations through the daemon. Nothing is pickled.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import msgpack
import psutil
import torch
import torch.distributed as dist

from mtpd.rpc import WorkerTLS
from mtpd.v1 import worker_pb2 as pb
from mtpd.worker.rendezvous_store import RegistryStore

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransportError(RuntimeError):
    """A neighbour died, hung past the receive bound, or sent something malformed."""


def encode(hidden: torch.Tensor) -> pb.Activations:
    name = str(hidden.dtype).removeprefix("torch.")
    header = msgpack.packb({"shape": list(hidden.shape), "dtype": name})
    data = hidden.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return pb.Activations(header=header, data=data)


def decode(message: pb.Activations, rows: int, width: int) -> torch.Tensor:
    """The tensor in `message`, checked against the shape the step implies."""
    try:
        header = msgpack.unpackb(message.header)
        shape, dtype = list(header["shape"]), DTYPES[header["dtype"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise TransportError(f"malformed activation header: {e}") from e
    if shape != [rows, width]:
        raise TransportError(f"activations of shape {shape}, the step needs {[rows, width]}")
    want = rows * width * dtype.itemsize
    if len(message.data) != want:
        raise TransportError(f"activations of {len(message.data)} bytes, expected {want}")
    return torch.frombuffer(bytearray(message.data), dtype=dtype).view(rows, width)


def interface_towards(host: str, port: int) -> str | None:
    """The name of the network interface this host reaches `host` through, if any."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # a datagram socket sends nothing to connect
            local = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == local for a in addresses):
            return name
    return None


class DistLink:
    """This stage's connections to its neighbours in a torch.distributed process group
    made of the workers only (the daemon holds no tensors and is not a member)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        rendezvous: str,
        device: torch.device,
        timeout: timedelta,
        token: str | None = None,
        tls: WorkerTLS | None = None,
    ) -> None:
        """token, tls: a remote worker's, for the daemon's rendezvous store."""
        self.rank, self.world_size, self.device, self.timeout = rank, world_size, device, timeout
        if rendezvous.startswith("mtpd://"):
            # mtpd://HOST:PORT[/PREFIX]: the daemon's registry, behind the worker token
            # (a fresh PREFIX after each restart: a fresh group on the same store).
            address, _, prefix = rendezvous.removeprefix("mtpd://").partition("/")
            host, port = address.rsplit(":", 1)
            # gloo (and NCCL's bootstrap) on the interface that reaches the daemon: the
            # pipeline's network, not every interface of the host.
            interface = interface_towards(host.strip("[]"), int(port))
            if interface is not None:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
                os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
            # Kept referenced here: torch holds only its C++ half, and a Python store
            # collected under it answers every call with "Not implemented".
            self._registry_store = RegistryStore(address, token, tls, timeout)
            store: dist.Store = self._registry_store
            if prefix:
                store = dist.PrefixStore(prefix, store)
        else:
            # Local workers: a file in the daemon's private runtime directory, so no
            # port is opened; gloo's own sockets are bound to loopback.
            store = dist.FileStore(rendezvous, world_size)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
        self._pending_send: dist.Work | None = None
        self._pending_tensor: torch.Tensor | None = None

    def recv(self, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(rows, width, dtype=dtype, device=self.device)
        try:
            dist.irecv(buf, src=self.rank - 1).wait(self.timeout)
        except RuntimeError as e:
            raise TransportError(f"receiving activations from stage {self.rank - 1}: {e}") from e
        return buf

    def send(self, hidden: torch.Tensor) -> None:
        """Start sending; the previous send must have completed first, so at most one
        is outstanding and its tensor stays alive until then."""
        self.flush()
        self._pending_tensor = hidden.contiguous()
        self._pending_send = dist.isend(self._pending_tensor, dst=self.rank + 1)

    def flush(self) -> None:
        if self._pending_send is None:
            return
        try:
            self._pending_send.wait(self.timeout)
        except RuntimeError as e:
            raise TransportError(f"sending activations to stage {self.rank + 1}: {e}") from e
        finally:
            self._pending_send = self._pending_tensor = None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
