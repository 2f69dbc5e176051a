"""``/metrics``: the SDK's metrics in the Prometheus text exposition format (version 0.0.4).

Why our own ~100 lines rather than ``opentelemetry-exporter-prometheus``: that package is a
beta (0.x) that registers a collector in ``prometheus_client``'s process-global registry (a
second meter provider in one process, as tests and ``vapora up`` restarts make, collides with
the first), and it rewrites names by its own rules (unit suffixes, ``_total``), so the guide's
``vapora_llm_provider_requests_total`` would not come out as the guide spells it. Here a pull
reader (the SDK's ``InMemoryMetricReader``, cumulative) is collected on each scrape and written
out with the names of :mod:`vapora.telemetry.semconv`, dots made underscores, plus the
compatibility spec's unit suffix (``_seconds``) where a name lacks it.

The endpoint is a small threaded HTTP server: a scrape never waits on the actors' event loop,
and the SDK's collection is thread-safe.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    Sum,
)

__all__ = ["CONTENT_TYPE", "MetricsEndpoint", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def metric_name(name: str, unit: str) -> str:
    """The Prometheus name of an OpenTelemetry metric (invalid characters become ``_``)."""
    base = _INVALID.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit)
    if suffix and not base.endswith(f"_{suffix}") and f"_{suffix}_" not in base:
        base = f"{base}_{suffix}"
    return base


def label_name(name: str) -> str:
    return _INVALID.sub("_", name).replace(":", "_")


def _escape(value: object) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(attributes: Mapping[str, Any], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{label_name(k)}="{_escape(v)}"' for k, v in sorted(attributes.items())]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _series(metric: Metric) -> Iterator[str]:
    data = metric.data
    if isinstance(data, Sum):
        kind = "counter" if data.is_monotonic else "gauge"
        name = metric_name(metric.name, metric.unit or "")
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        yield f"# HELP {name} {_escape(metric.description)}"
        yield f"# TYPE {name} {kind}"
        for point in data.data_points:
            yield f"{name}{_labels(point.attributes or {})} {_number(point.value)}"
    elif isinstance(data, Gauge):
        name = metric_name(metric.name, metric.unit or "")
        yield f"# HELP {name} {_escape(metric.description)}"
        yield f"# TYPE {name} gauge"
        for gauge_point in data.data_points:
            labels = _labels(gauge_point.attributes or {})
            yield f"{name}{labels} {_number(gauge_point.value)}"
    elif isinstance(data, Histogram):
        yield from _histogram(metric, data)


def _histogram(metric: Metric, data: Histogram) -> Iterator[str]:
    name = metric_name(metric.name, metric.unit or "")
    yield f"# HELP {name} {_escape(metric.description)}"
    yield f"# TYPE {name} histogram"
    for point in data.data_points:
        attributes = point.attributes or {}
        cumulative = 0
        for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
            cumulative += count
            yield f"{name}_bucket{_labels(attributes, ('le', _number(bound)))} {cumulative}"
        yield f"{name}_bucket{_labels(attributes, ('le', '+Inf'))} {point.count}"
        yield f"{name}_sum{_labels(attributes)} {_number(point.sum)}"
        yield f"{name}_count{_labels(attributes)} {point.count}"


def render(data: MetricsData | None) -> str:
    """The text exposition of ``data`` (every resource and scope, merged)."""
    lines: list[str] = []
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                lines.extend(_series(metric))
    return "".join(f"{line}\n" for line in lines)


class MetricsEndpoint:
    """Serves ``GET /metrics`` from ``reader`` on ``host:port`` in a daemon thread."""

    def __init__(self, reader: InMemoryMetricReader, host: str, port: int) -> None:
        self.reader = reader
        handler = type("_Handler", (_Handler,), {"reader": reader})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="vapora-metrics", daemon=True
        )

    def start(self) -> MetricsEndpoint:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    reader: InMemoryMetricReader

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = render(self.reader.get_metrics_data()).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""
