"""Prometheus metrics of the node daemon (`cni-bridge daemon --metrics-address HOST:PORT`).

The calls run in forked workers, so the counters use prometheus_client's
multiprocess mode: every process writes its values to mmap'd files in a
private directory, and a scrape adds up the files of all processes, those of
workers that exited included (a counter keeps what a replaced worker counted).
The supervisor serves the scrapes from its own loop (no thread: it forks), and
computes the IPAM gauges at scrape time from the conflists and the stores,
with the code `cni-bridge inspect` uses. Off by default; nothing here is ever
imported by the exec'd plugin.

prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported,
so `start()` sets it before that import; `NoMetrics` stands in when off.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, TypeVar

log = logging.getLogger("cni-bridge.daemon")
F = TypeVar("F", bound=Callable[..., Any])

PREFIX = "cni_bridge_daemon"
# CNI calls take milliseconds through the daemon, seconds when iptables or the store lock is slow.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DIR_PREFIX = "cni-bridge-metrics-"   # beside the daemon's socket
SCRAPE_TIMEOUT = 2.0     # a slow or stuck scraper must not hold the supervisor's loop longer


VERBS = frozenset({"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"})


def verb_label(verb: str) -> str:
    """Clients choose CNI_COMMAND: anything else than a verb is one label, not one each."""
    return verb if verb in VERBS else "other"


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:9153; port 0 picks a free one); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def call_result(exit_status: int, stdout: str) -> str:
    """The label of a call's outcome: "0" for success, else the CNI error code it answered."""
    if exit_status == 0:
        return "0"
    try:
        code = json.loads(stdout).get("code")
    except (ValueError, AttributeError):
        code = None
    return str(code) if isinstance(code, int) else "unknown"


def _never_fails(hook: F) -> F:
    """Counting must never fail or delay a CNI call (say the metrics files' disk is full)."""
    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except Exception as exc:
            log.warning("metrics: %s failed: %s", hook.__name__, exc)
            return None
    return run  # type: ignore[return-value]


class NoMetrics:
    """The daemon without --metrics-address: every hook does nothing."""

    address: Optional[tuple[str, int]] = None

    def fileno(self) -> Optional[int]:
        return None

    def serve_one(self) -> None:
        pass

    def call_started(self, verb: str) -> None:
        pass

    def call_finished(self, verb: str, result: str, seconds: float) -> None:
        pass

    def fallback(self, reason: str) -> None:
        pass

    def worker_exited(self, pid: int, how: str, restarted: bool, lost_call: bool) -> None:
        pass

    def close_inherited(self) -> None:
        pass

    def close(self) -> None:
        pass


class DaemonMetrics(NoMetrics):
    def __init__(self, address: tuple[str, int], parent_dir: str, conf_dir: str, workers: int) -> None:
        _remove_stale(parent_dir)
        # Before the first import of prometheus_client (it picks its value class then).
        self.directory = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

        self._multiprocess = multiprocess
        self.calls = Counter(f"{PREFIX}_calls", "CNI calls served, by verb and result (0 or the CNI error code)",
                             ["verb", "result"], registry=None)
        self.latency = Histogram(f"{PREFIX}_call_duration_seconds", "Time to serve a CNI call, by verb",
                                 ["verb"], buckets=LATENCY_BUCKETS, registry=None)
        self.in_flight = Gauge(f"{PREFIX}_calls_in_flight", "CNI calls being served now",
                               multiprocess_mode="livesum", registry=None)
        self.fallbacks = Counter(f"{PREFIX}_fallbacks",
                                 "Calls the plugin ran in-process instead, because the daemon refused them "
                                 "or the worker serving them died", ["reason"], registry=None)
        self.restarts = Counter(f"{PREFIX}_worker_restarts", "Workers replaced, by why the old one exited",
                                ["reason"], registry=None)
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=self.directory)
        self.registry.register(_NodeCollector(conf_dir, workers, time.time()))
        self._server = _scrape_server(address, self.registry)
        self.address = self._server.server_address[:2]

    # the supervisor's loop ------------------------------------------------------
    def fileno(self) -> Optional[int]:
        return self._server.fileno()

    @_never_fails
    def serve_one(self) -> None:
        self._server.handle_request()

    # hooks ------------------------------------------------------------------------
    @_never_fails
    def call_started(self, verb: str) -> None:
        self.in_flight.inc()

    @_never_fails
    def call_finished(self, verb: str, result: str, seconds: float) -> None:
        self.in_flight.dec()
        self.calls.labels(verb_label(verb), result).inc()
        self.latency.labels(verb_label(verb)).observe(seconds)

    @_never_fails
    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()

    @_never_fails
    def worker_exited(self, pid: int, how: str, restarted: bool, lost_call: bool) -> None:
        """`how`: "signal", "error" (non-zero exit) or "recycled" (served its share of calls)."""
        # A dead worker's live gauges (its in-flight call) must stop counting; its counters stay.
        self._multiprocess.mark_process_dead(pid, self.directory)
        if lost_call:
            self.fallback("worker-died")
        if restarted:
            self.restarts.labels(how).inc()

    def close_inherited(self) -> None:
        """In a forked worker: the scrape socket is the supervisor's."""
        self._server.socket.close()

    def close(self) -> None:
        self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _remove_stale(parent_dir: str) -> None:
    """Directories a killed daemon left: the daemon starts only when no other serves its socket,
    so none of them is in use (the counters restart at zero, as Prometheus expects of a restart)."""
    try:
        names = os.listdir(parent_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(DIR_PREFIX):
            shutil.rmtree(os.path.join(parent_dir, name), ignore_errors=True)


def start(address: str, parent_dir: str, conf_dir: str, workers: int) -> DaemonMetrics:
    return DaemonMetrics(parse_address(address), parent_dir, conf_dir, workers)


def _scrape_server(address: tuple[str, int], registry: Any) -> Any:
    """A one-request-at-a-time HTTP server the supervisor drives from its select loop."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    class Handler(WSGIRequestHandler):
        timeout = SCRAPE_TIMEOUT

        def log_message(self, *args: Any) -> None:   # no line per scrape on stderr
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        timeout = 0   # handle_request() after select() said ready: never block

        def handle_error(self, request: Any, client_address: Any) -> None:   # one line, no traceback
            log.info("metrics: a scrape from %s failed", client_address)

    return make_server(address[0], address[1], make_wsgi_app(registry), server_class=Server,
                       handler_class=Handler)


class _NodeCollector:
    """Gauges read at scrape time: the daemon itself, and IPAM usage per network and range."""

    def __init__(self, conf_dir: str, workers: int, started: float) -> None:
        self.conf_dir, self.workers, self.started = conf_dir, workers, started

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from .inspect.pools import network_pools

        yield GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes the daemon keeps", value=self.workers)
        yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds", "When the daemon started (Unix time)",
                                value=self.started)
        used = GaugeMetricFamily("cni_bridge_ipam_addresses_used",
                                 "Addresses held in this boot, per network and range", labels=["network", "range"])
        free = GaugeMetricFamily("cni_bridge_ipam_addresses_free",
                                 "Addresses ADD can still hand out (an earlier boot's count as free), "
                                 "per network and range", labels=["network", "range"])
        try:
            found = network_pools(self.conf_dir)
        except Exception as exc:   # the other metrics still get out
            log.warning("metrics: cannot read the IPAM pools of %s: %s", self.conf_dir, exc)
            found = []
        for network, pools in found:
            for pool in pools:
                used.add_metric([network, pool.label], pool.used)
                free.add_metric([network, pool.label], pool.free)
        yield used
        yield free
