"""Where the daemon listens by default, and how clients find it: one convention for
`mtpd serve`, the SDK and the CLI. Torch-free: the client imports it."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
import tempfile
from pathlib import Path

ADDRESS_ENV = "MTPD_ADDRESS"
SERVICE_USER = "mtpd"  # the system service's user (systemd/mtpd.service)
# More users (names or uids, comma-separated) whose sockets a client trusts: a daemon
# of another service user, a socket bind-mounted from a container.
TRUSTED_OWNERS_ENV = "MTPD_TRUSTED_SOCKET_OWNERS"
# The system service's socket (systemd's RuntimeDirectory=mtpd).
SYSTEM_SOCKET = Path("/run/mtpd/mtpd.sock")


def tcp_listen(listen: str) -> tuple[str, str, socket.AddressFamily]:
    """HOST:PORT as a TCP listener takes it: the host without IPv6 brackets (loopback
    when empty), the port as given, and the address family the host needs."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    return host, port, socket.AF_INET6 if ":" in host else socket.AF_INET


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


def socket_distrust(path: Path) -> str | None:
    """Why a client should not talk to the unix socket at `path`, or None: it, the file
    it links to, or their directory belongs to another user than the caller, root or
    the mtpd service, or others may write to the directory (without the sticky bit)
    and so replace the socket. A missing socket is no reason (connecting says so)."""
    trusted = {os.geteuid(), 0}
    named = [SERVICE_USER, *filter(None, os.environ.get(TRUSTED_OWNERS_ENV, "").split(","))]
    for owner in (n.strip() for n in named):
        if owner.isdigit():
            trusted.add(int(owner))
        else:
            with contextlib.suppress(KeyError):  # no such user (no system service here)
                trusted.add(pwd.getpwnam(owner).pw_uid)
    try:
        link, target = path.lstat(), path.stat()
        folder = path.resolve().parent.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path}: cannot inspect it: {e.strerror}"
    for what, info in (("the socket", link), ("its target", target), ("its directory", folder)):
        if info.st_uid not in trusted:
            return (
                f"{path}: {what} belongs to uid {info.st_uid}, not to you, root or "
                f"{SERVICE_USER} (${TRUSTED_OWNERS_ENV} may name more)"
            )
    if folder.st_mode & 0o002 and not folder.st_mode & stat.S_ISVTX:
        return f"{path}: anyone may replace it (its directory is writable by all)"
    return None
