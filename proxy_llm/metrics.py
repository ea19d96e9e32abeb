"""Counters, gauges and histograms rendered as Prometheus text exposition (format 0.0.4).

Every mutation takes the registry's lock (no reliance on the GIL). Label values must come from
bounded sets (configured names and globs, status classes, fixed endpoint names): never from raw
client input. This module imports nothing from the package.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

LabelValues = Tuple[str, ...]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = ['%s="%s"' % (n, _escape(v)) for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{%s}" % ",".join(parts) if parts else ""


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, registry: "Registry", name: str, help: str, labels: Sequence[str]):
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self._lock = registry.lock

    def header(self) -> List[str]:
        return ["# HELP %s %s" % (self.name, self.help), "# TYPE %s %s" % (self.name, self.kind)]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: Dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + amount

    def inc_locked(self, labels: LabelValues, amount: float = 1) -> None:
        """``inc`` for a caller already holding the registry's lock."""
        self._values[labels] = self._values.get(labels, 0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> List[str]:
        lines = self.header()
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0)]
        for labels, value in items:
            lines.append("%s%s %s" % (self.name, _labels(self.labelnames, labels), _num(value)))
        return lines


class Reading(_Metric):
    """A value read from a callable at render time (so it can never drift).

    ``kind`` is "gauge", or "counter" for a monotonic total kept elsewhere (the recorder's).
    """

    def __init__(self, registry: "Registry", name: str, help: str, read: Callable[[], float], kind: str = "gauge"):
        super().__init__(registry, name, help, ())
        self.read = read
        self.kind = kind

    def render(self) -> List[str]:
        return self.header() + ["%s %s" % (self.name, _num(self.read()))]


class Info(_Metric):
    """One sample of value 1 whose labels say what (fixed when it is made)."""

    kind = "gauge"

    def __init__(self, registry: "Registry", name: str, help: str, labels: Dict[str, str]):
        super().__init__(registry, name, help, tuple(labels))
        self.sample = "%s%s 1" % (name, _labels(tuple(labels), tuple(labels.values())))

    def render(self) -> List[str]:
        return self.header() + [self.sample]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: "Registry", name: str, help: str, labels: Sequence[str], buckets: Sequence[float]):
        super().__init__(registry, name, help, labels)
        self.buckets = tuple(buckets)
        self._values: Dict[LabelValues, List[float]] = {}  # counts per bucket + [+Inf count, sum]

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            self.observe_locked(value, labels)

    def observe_locked(self, value: float, labels: LabelValues) -> None:
        """``observe`` for a caller already holding the registry's lock."""
        row = self._values.get(labels)
        if row is None:
            row = self._values[labels] = [0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            row = self._values.get(labels)
            return int(sum(row[:-1])) if row else 0

    def render(self) -> List[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        for labels, row in items:
            cumulative = 0
            for bound, count in zip(self.buckets, row):
                cumulative += count
                lines.append("%s_bucket%s %d" % (self.name, _labels(self.labelnames, labels, 'le="%s"' % _num(bound)), cumulative))
            cumulative += row[len(self.buckets)]
            lines.append("%s_bucket%s %d" % (self.name, _labels(self.labelnames, labels, 'le="+Inf"'), cumulative))
            lines.append("%s_sum%s %s" % (self.name, _labels(self.labelnames, labels), repr(float(row[-1]))))
            lines.append("%s_count%s %d" % (self.name, _labels(self.labelnames, labels), cumulative))
        return lines


class Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # protects every metric's values
        self._metrics: List[_Metric] = []

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(self, name, help, labels))

    def info(self, name: str, help: str, labels: Dict[str, str]) -> Info:
        return self._add(Info(self, name, help, labels))

    def reading(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> Reading:
        return self._add(Reading(self, name, help, read, kind))

    def histogram(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        return self._add(Histogram(self, name, help, labels, buckets))

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def names(self) -> List[str]:
        return [m.name for m in self._metrics]

    def render(self) -> bytes:
        lines: List[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode("utf-8")


class ProxyMetrics:
    """The proxy's metric set. Gauges are wired by the server once its state exists."""

    def __init__(self, inflight: Callable[[], float], written: Callable[[], float],
                 dropped: Callable[[], float], queue_depth: Callable[[], float], connections: Callable[[], float],
                 stream_dropped: Callable[[], float] = lambda: 0, worker: int = 0, pid: int = 0,
                 reserved: Callable[[], float] = lambda: 0, uncounted: Callable[[], float] = lambda: 0,
                 queue_bytes: Callable[[], float] = lambda: 0):
        r = self.registry = Registry()
        # Which process answered: with --workers, a scrape of the port reaches one of them.
        r.info("proxy_llm_worker_info", "The process that answered: worker number and pid.",
               {"worker": str(worker), "pid": str(pid)})
        self.requests = r.counter("proxy_llm_requests_total", "Exchanges handled, by outcome.",
                                  ("provider", "endpoint", "status_class", "model"))
        self.duration = r.histogram("proxy_llm_request_duration_seconds", "Exchange duration, request start to end.",
                                    ("provider", "endpoint"), DURATION_BUCKETS)
        self.ttft = r.histogram("proxy_llm_time_to_first_token_seconds",
                                "Streams: request start to the first response body byte.",
                                ("provider", "endpoint"), TTFT_BUCKETS)
        self.tokens = r.counter("proxy_llm_tokens_total", "Tokens reported by upstreams.", ("provider", "model", "kind"))
        self.endings = r.counter("proxy_llm_exchange_endings_total", "Exchanges by how they ended.", ("ended",))
        r.reading("proxy_llm_inflight_requests", "Exchanges in progress.", inflight)
        r.reading("proxy_llm_open_connections", "Client connections open.", connections)
        # Past max_connections: the reserve for /health and /metrics, and what is refused (a
        # 503 at once, or on the reserve for another path). Counted on the refusal only.
        r.reading("proxy_llm_reserve_connections", "Connections past max_connections on the reserve for /health "
                  "and /metrics.", reserved)
        self.refused = r.counter("proxy_llm_connections_refused_total", "Client connections answered 503 because "
                                 "max_connections was reached (past the reserve, or on it for another path).")
        r.reading("proxy_llm_records_written_total", "Records written to disk.", written, "counter")
        r.reading("proxy_llm_records_dropped_total", "Records lost: queue full, encode or write failure.", dropped, "counter")
        r.reading("proxy_llm_stream_lines_dropped_total", "Lines of streams/ files lost (a write failure): their "
                  "records say stream_events all the same.", stream_dropped, "counter")
        r.reading("proxy_llm_record_queue_depth", "Records waiting for the writer thread (record: false: answers "
                  "waiting to be read for the token metrics).", queue_depth)
        r.reading("proxy_llm_record_queue_bytes", "Body bytes the records waiting for the writer thread hold "
                  "(record: false: the answers').", queue_bytes)
        r.reading("proxy_llm_token_counts_dropped_total", "record: false: exchanges left out of proxy_llm_tokens_total "
                  "and proxy_llm_exchange_endings_total (the queue of answers to read was full, or closed at shutdown).",
                  uncounted, "counter")
        self.upstream_errors = r.counter("proxy_llm_upstream_errors_total", "Upstream failures by kind.",
                                         ("provider", "kind"))

    def exchange(self, provider: str, endpoint: str, status_class: str, model: str, duration: float,
                 ttft: Optional[float]) -> None:
        """Count one finished exchange (one lock acquisition for all its metrics)."""
        with self.registry.lock:
            self.requests.inc_locked((provider, endpoint, status_class, model))
            self.duration.observe_locked(duration, (provider, endpoint))
            if ttft is not None:
                self.ttft.observe_locked(ttft, (provider, endpoint))

    def recorded(self, ended: str, provider: str, model: str, tokens: Optional[dict]) -> None:
        """Count one encoded record: how its exchange ended and the tokens its upstream reported
        (the sum, ``total_tokens``, is not a kind of its own); one lock acquisition for all."""
        with self.registry.lock:
            self.endings.inc_locked((ended,))
            if tokens:
                for kind, value in tokens.items():
                    # (a counter never goes down: a count below 1 adds nothing)
                    if kind != "total_tokens" and isinstance(value, (int, float)) and value > 0:
                        self.tokens.inc_locked((provider, model, kind), value)

    def render(self) -> bytes:
        return self.registry.render()


def status_class(status: Optional[int]) -> str:
    return "%dxx" % (status // 100) if status else "none"
