"""Running under systemd: the units verify, and the daemon speaks the readiness
protocol (STATUS while loading, READY=1 once serving, WATCHDOG=1, STOPPING=1) and
drains on SIGTERM: running streams finish, new ones are refused, exit 0."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_daemon import LiveDaemon, write_served_model

from mtpd.client import Client, Unavailable

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("unit", "as_name"),
    [("mtpd.service", "mtpd.service"), ("mtpd-worker@.service", "mtpd-worker@0.service")],
)
def test_units_pass_systemd_analyze_verify(tmp_path, unit, as_name):
    mtpd = shutil.which("mtpd")
    assert mtpd, "the mtpd command is not installed"
    text = (SYSTEMD / unit).read_text().replace("/usr/local/bin/mtpd", str(Path(mtpd).resolve()))
    (tmp_path / as_name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", as_name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


class FakeSystemd:
    """A NOTIFY_SOCKET that records every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def fields(self) -> list[str]:
        return [line for m in list(self.messages) for line in m.splitlines()]


def test_readiness_watchdog_and_a_draining_shutdown(tmp_path):
    model = write_served_model(tmp_path / "model")
    systemd = FakeSystemd(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}
    daemon = LiveDaemon(model, tmp_path / "daemon", "--drain-timeout", "60", env=env)
    fields = systemd.fields()
    loading = next(i for i, f in enumerate(fields) if f.startswith("STATUS=loading layers"))
    assert "layers 0-1 on worker 0, layers 2-3 on worker 1" in fields[loading]
    assert fields.index("READY=1") > loading

    with Client(daemon.address) as client:
        running = client.stream("Drain me", max_tokens=200, ignore_eos=True)
        deltas = iter(running)
        next(deltas)
        daemon.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(daemon.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest()).status == SERVING:
                time.sleep(0.02)
        with pytest.raises(Unavailable, match="shutting down"):
            client.generate("Too late", max_tokens=2)
        for _ in deltas:
            pass
        assert running.result.finish_reason == "length"
        assert running.result.completion_tokens == 200
    assert daemon.process.wait(timeout=60) == 0
    fields = systemd.fields()
    assert "STOPPING=1" in fields and "WATCHDOG=1" in fields
    assert fields.index("STOPPING=1") > fields.index("READY=1")
