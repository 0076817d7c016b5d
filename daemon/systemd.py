"""Telling systemd how the daemon is doing (sd_notify, without libsystemd): STATUS
lines while loading, READY=1 once serving, WATCHDOG=1 while healthy, STOPPING=1 on the
way out. Without $NOTIFY_SOCKET (not under systemd) every call does nothing."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, *fields: str) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(OSError):  # systemd gone: nothing to tell
            self._socket.sendto("\n".join(fields).encode(), self._address)

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self.notify("READY=1", f"STATUS={text}")

    def stopping(self, text: str) -> None:
        self.notify("STOPPING=1", f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between WATCHDOG=1 pings (half systemd's WatchdogSec), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
