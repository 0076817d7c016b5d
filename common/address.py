"""Where the daemon listens by default, and how clients find it: one convention for
`mtpd serve`, the SDK and the CLI. Torch-free: the client imports it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ADDRESS_ENV = "MTPD_ADDRESS"
# The system service's socket (systemd's RuntimeDirectory=mtpd).
SYSTEM_SOCKET = Path("/run/mtpd/mtpd.sock")


def user_socket() -> Path:
    """A daemon run by a user without the system directory listens here."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "mtpd" if runtime else Path(tempfile.gettempdir()) / f"mtpd-{os.getuid()}"
    )
    return base / "mtpd.sock"


def default_socket() -> Path:
    """Where `mtpd serve` listens unless told otherwise."""
    return SYSTEM_SOCKET if os.access(SYSTEM_SOCKET.parent, os.W_OK) else user_socket()


def client_address(given: str | None = None) -> str:
    """The gRPC target: the argument, else $MTPD_ADDRESS, else the user's socket if a
    daemon of this user listens there, else the system service's. A bare path means a
    unix socket; HOST:PORT means TCP."""
    address = given or os.environ.get(ADDRESS_ENV)
    if not address:
        mine = user_socket()
        path = mine if mine.exists() or not SYSTEM_SOCKET.exists() else SYSTEM_SOCKET
        return f"unix:{path}"
    return f"unix:{address}" if address.startswith(("/", ".")) else address
