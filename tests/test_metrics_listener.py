"""`mtpd serve --metrics-listen`: behind the API token when one is set, on a loopback
address only when none is, and a client that sends nothing is dropped."""

from __future__ import annotations

import socket
import time

import pytest
from live_daemon import http_request

from mtpd.daemon.frontend import Frontend, Limits
from mtpd.daemon.metrics import _QuietHandler, serve_metrics
from mtpd.model.errors import InputError


def scrape(where: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http_request(f"http://{where}", "GET", "/metrics", headers=headers, timeout=10)


def test_metrics_need_the_token_when_one_is_set():
    where, _ = serve_metrics(Frontend(Limits()), "127.0.0.1:0", "s3cret")
    assert scrape(where)[0] == 401
    assert scrape(where, "wrong")[0] == 401
    status, body = scrape(where, "s3cret")
    assert status == 200 and b"mtpd_requests_total 0.0" in body


def test_without_a_token_only_a_loopback_address_serves_them():
    with pytest.raises(InputError, match="not a loopback address"):
        serve_metrics(Frontend(Limits()), "0.0.0.0:0", None)
    where, _ = serve_metrics(Frontend(Limits()), "127.0.0.1:0", None)
    assert scrape(where)[0] == 200


def test_a_silent_client_delays_no_scrape_and_is_dropped(monkeypatch):
    monkeypatch.setattr(_QuietHandler, "timeout", 1.0)
    where, _ = serve_metrics(Frontend(Limits()), "127.0.0.1:0", None)
    host, port = where.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    silent.sendall(b"GET /metr")  # and nothing more
    start = time.monotonic()
    assert scrape(where)[0] == 200
    assert time.monotonic() - start < 0.5
    time.sleep(1.5)
    assert silent.recv(1) == b""  # closed by the server


def test_an_ipv6_loopback_address_serves_them():
    where, _ = serve_metrics(Frontend(Limits()), "[::1]:0", None)
    assert where.startswith("[::1]:") and scrape(where)[0] == 200
