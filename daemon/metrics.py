"""Prometheus metrics (`mtpd serve --metrics-listen HOST:PORT`): read at each scrape from
the service's counters, the scheduler and the workers (their stats at most once a
second), so nothing on the request path pays for them."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from mtpd.address import tcp_listen
from mtpd.daemon.frontend import Frontend
from mtpd.model.errors import InputError
from mtpd.rpc import bearer_token_matches

log = logging.getLogger("mtpd.daemon")


STATS_MAX_AGE_S = 1.0


class DaemonCollector(Collector):
    def __init__(self, front: Frontend) -> None:
        self.front = front
        self._lock = threading.Lock()
        self._stats: list = []
        self._asked_at = -STATS_MAX_AGE_S

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.front
        yield CounterMetricFamily("mtpd_requests", "Generations admitted", value=s.requests)
        yield CounterMetricFamily(
            "mtpd_requests_rejected", "Requests refused: bad input or a full queue", s.rejected
        )
        finished = CounterMetricFamily(
            "mtpd_requests_finished", "Generations ended, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.finished.items()):
            finished.add_metric([reason], n)
        yield finished
        yield CounterMetricFamily("mtpd_prompt_tokens", "Prompt tokens admitted", s.prompt_tokens)
        yield CounterMetricFamily(
            "mtpd_generated_tokens", "Tokens generated and sent", s.completion_tokens
        )
        daemon = s.daemon
        yield GaugeMetricFamily("mtpd_ready", "1 once the model is loaded", int(daemon is not None))
        if daemon is None:
            return
        running, queued = daemon.scheduler.load()
        yield GaugeMetricFamily("mtpd_requests_running", "Sequences being decoded", running)
        yield GaugeMetricFamily("mtpd_queue_depth", "Requests waiting for admission", queued)
        scheduler = daemon.scheduler
        yield CounterMetricFamily(
            "mtpd_prompt_tokens_cached",
            "Prompt tokens taken from an earlier request's cache (prefix caching)",
            scheduler.prefix.cached_prompt_tokens,
        )
        yield CounterMetricFamily(
            "mtpd_prefix_cache_evictions",
            "Kept caches released for a new request's slot",
            scheduler.prefix.evictions,
        )
        yield GaugeMetricFamily(
            "mtpd_prefix_caches",
            "Finished requests' caches kept for later prompts",
            scheduler.retained_caches,
        )
        drafts = daemon.scheduler.stats
        acceptance = GaugeMetricFamily(
            "mtpd_draft_acceptance",
            "Of the steps that drafted position i, the share where it was accepted",
            labels=["position"],
        )
        for i, rate in enumerate(drafts.acceptance_by_position):
            acceptance.add_metric([str(i + 1)], rate)
        yield acceptance
        yield GaugeMetricFamily(
            "mtpd_tokens_per_step",
            "Tokens per verification step (accepted drafts + 1)",
            drafts.tokens_per_step,
        )
        yield CounterMetricFamily(
            "mtpd_verification_steps", "Verification steps after prompts", drafts.steps
        )
        restarts = CounterMetricFamily(
            "mtpd_worker_restarts", "Workers replaced after dying or wedging", labels=["worker"]
        )
        for rank, n in enumerate(daemon.pipeline.restarts):
            restarts.add_metric([str(rank)], n)
        yield restarts
        yield from self._workers(daemon)

    def _workers(self, daemon) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Each scrape would ask every worker: answers younger than a second are reused.
        with self._lock:
            if time.monotonic() - self._asked_at >= STATS_MAX_AGE_S:
                try:
                    self._stats = daemon.pipeline.worker_stats()
                except Exception as e:  # a dead worker: the rest of the metrics still count
                    log.warning("metrics: a worker did not answer: %s", e)
                    self._stats = []
                self._asked_at = time.monotonic()
            workers = self._stats
        if not workers:
            return
        families = {
            "steps": CounterMetricFamily("mtpd_stage_steps", "Steps run", labels=["worker"]),
            "compute": CounterMetricFamily(
                "mtpd_stage_compute_seconds", "Compute time of steps", labels=["worker"]
            ),
            "recv": CounterMetricFamily(
                "mtpd_stage_recv_wait_seconds",
                "Time waiting for activations from the previous stage",
                labels=["worker"],
            ),
            "send": CounterMetricFamily(
                "mtpd_stage_send_seconds", "Time sending activations", labels=["worker"]
            ),
            "cached": GaugeMetricFamily(
                "mtpd_kv_cache_sequences", "Sequences holding KV cache", labels=["worker"]
            ),
            "slots": GaugeMetricFamily(
                "mtpd_kv_cache_slots", "Sequence slots of the KV cache", labels=["worker"]
            ),
        }
        for rank, w in enumerate(workers):
            label = [str(rank)]
            families["steps"].add_metric(label, w.steps)
            families["compute"].add_metric(label, w.compute_s)
            families["recv"].add_metric(label, w.recv_wait_s)
            families["send"].add_metric(label, w.send_s)
            families["cached"].add_metric(label, w.active_sequences)
            families["slots"].add_metric(label, w.max_seqs)
        yield from families.values()


def metrics_registry(front: Frontend) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(front))
    return registry


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that sends nothing, or slowly, is dropped after this

    def log_message(self, *args: object) -> None:  # scrapes are not worth a log line
        pass


def serve_metrics(front: Frontend, listen: str, token: str | None) -> tuple[str, threading.Thread]:
    """Start the /metrics endpoint (behind the API token when one is set; without one,
    on a loopback address only); returns the address it listens on."""
    host, port, family = tcp_listen(listen)
    if not token and not _loopback(host):
        raise InputError(
            f"--metrics-listen {listen}: not a loopback address, and no --api-token-file "
            "to guard it: the metrics would be open to anyone who reaches it"
        )
    metrics = make_wsgi_app(metrics_registry(front))

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        sent = environ.get("HTTP_AUTHORIZATION", "")
        if token and not bearer_token_matches([("authorization", sent)], token):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer")])
            return [b"a bearer token is needed (--api-token-file)\n"]
        return metrics(environ, start_response)

    # Each connection on a thread of its own, so a slow one delays no other scrape.
    server_class = type(
        "MetricsServer",
        (ThreadingWSGIServer,),
        {"address_family": family},
    )
    try:
        server = make_server(
            host, int(port), guarded, server_class=server_class, handler_class=_QuietHandler
        )
    except (OSError, ValueError) as e:
        raise InputError(f"--metrics-listen {listen}: cannot listen there ({e})") from None
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="metrics")
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{server.server_port}", thread


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
