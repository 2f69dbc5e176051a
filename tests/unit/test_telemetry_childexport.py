"""OTLP export from a child process (vapora.telemetry.childexport): the spans that reach the
collector are the spans made, byte for byte; a child that dies is replaced; a flush waits for
the collector; no child can be started: the process exports itself; the child goes when its
parent goes; credentials never reach its command line."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceFlags, TraceState

from actors import tracing
from tests.otlp_collector import collector
from vapora.config import TelemetryConfig
from vapora.telemetry import childexport, setup
from vapora.telemetry.childexport import ChildSpanExporter, _frames, _Rebuilder
from vapora.telemetry.export import SpanBatcher
from vapora.telemetry.otlp import encode_spans
from vapora.telemetry.state import STATE

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

ROOT = Path(__file__).resolve().parents[2]
ODD = {
    "s": "subject",
    "unicode": "größe ✓",
    "empty": "",
    "yes": True,
    "one": 1,
    "negative": -42,
    "big": 2**62,
    "float": 0.25,
    "strings": ("stop", "length"),
    "ints": (1, 2, 3),
    "bools": (True, False),
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "vapora-t", "n": 3}, "https://r"))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    yield memory
    tracing.use(None)


def _vapora_spans() -> None:
    remote = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01", "tracestate": "k=v,x=y"}
    with tracing.process_span("vapora.complete", remote, group="router"):
        with tracing.publish_span("vapora.provider.claude.call") as span:
            span.set_attributes(ODD)
            span.add_event("retry", {"attempt": 2})
            span.set_status(StatusCode.ERROR, "overloaded")
        published, _ = tracing.start_publish("vapora.events.route", msg_id="e-1", event_type="x")
        tracing.end_publish(published, TimeoutError("no ack"))
    link = Link(trace.SpanContext(7, 9, True, TraceFlags(1), TraceState([("a", "b")])), {"w": 1})
    STATE.start_span("process vapora.events.>", SpanKind.CONSUMER, {}, None, [link]).end()


def _sdk_spans() -> list[ReadableSpan]:
    """The SDK's own spans, one of them with attributes dropped by its limits."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource({"service.name": "x"}), span_limits=SpanLimits(max_span_attributes=3)
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("other", "1.2.3", schema_url="https://scope/1")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(5, 6, True, TraceFlags(1)))
    )
    with tracer.start_as_current_span("root", context=parent, attributes=ODD) as root:
        root.record_exception(ValueError("bad"))
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(StatusCode.OK)
    return list(memory.get_finished_spans())


def _through_the_pipe(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """``spans`` as the parent writes them and the child reads them back."""
    exporter = ChildSpanExporter("http://127.0.0.1:9")
    child = SimpleNamespace(resources={}, scopes={})
    frames = exporter._definitions(child, spans)  # type: ignore[arg-type]
    frames.append(exporter._frame(["spans", exporter._rows(child, spans)]))  # type: ignore[arg-type]
    exporter.shutdown()
    rebuilder, rebuilt = _Rebuilder(), []
    for item in _frames(io.BytesIO(b"".join(frames))):
        if item[0] == "spans":
            rebuilt.extend(rebuilder.span(row) for row in item[1])
        else:
            rebuilder.define(item)
    return rebuilt


def test_vapora_spans_reach_the_collector_as_the_same_bytes(
    spans: InMemorySpanExporter,
) -> None:
    _vapora_spans()
    made = list(spans.get_finished_spans())
    assert len(made) == 4
    assert encode_spans(_through_the_pipe(made)) == encode_spans(made)


def test_the_sdks_spans_reach_the_collector_as_the_same_bytes() -> None:
    made = _sdk_spans()
    assert made[1].dropped_attributes > 0  # the shape the row carries its counts for
    assert encode_spans(_through_the_pipe(made)) == encode_spans(made)


def _exporting(endpoint: str) -> tuple[ChildSpanExporter, TracerProvider]:
    exporter = ChildSpanExporter(f"{endpoint}/v1/traces")
    batcher = SpanBatcher(exporter, env={})
    provider = TracerProvider(resource=Resource({"service.name": "vapora-t"}))
    provider.add_span_processor(batcher)
    tracing.use(provider)
    return exporter, provider


def _span(name: str) -> None:
    with tracing.publish_span(name):
        pass


def test_a_flush_returns_once_the_collector_has_the_spans_and_counts_them() -> None:
    with collector() as (endpoint, received):
        exporter, provider = _exporting(endpoint)
        try:
            _span("vapora.one")
            assert provider.force_flush(10_000)
            assert received.span_names() == ["publish vapora.one"]
            assert exporter.sent == 1 and exporter.failed == 0 and exporter.child_cpu_ns > 0
        finally:
            tracing.use(None)
            provider.shutdown()


def test_a_child_that_dies_is_replaced_at_the_next_batch() -> None:
    with collector() as (endpoint, received):
        exporter, provider = _exporting(endpoint)
        try:
            _span("vapora.before")
            assert provider.force_flush(10_000)
            assert exporter._child is not None
            first = exporter._child.process
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            _span("vapora.after")
            assert provider.force_flush(10_000)
            assert exporter._child is not None and exporter._child.process.pid != first.pid
            assert received.span_names() == ["publish vapora.before", "publish vapora.after"]
        finally:
            tracing.use(None)
            provider.shutdown()


def test_without_a_child_the_process_exports_itself_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise OSError("no more processes")

    monkeypatch.setattr(childexport.subprocess, "Popen", refused)
    with collector() as (endpoint, received):
        _, provider = _exporting(endpoint)
        try:
            with caplog.at_level(logging.WARNING, "vapora.telemetry"):
                _span("vapora.local")
                assert provider.force_flush(10_000)
            assert received.span_names() == ["publish vapora.local"]
            assert "could not be started (no more processes)" in caplog.text
        finally:
            tracing.use(None)
            provider.shutdown()


def test_a_shut_down_exporter_takes_no_more_spans_and_its_child_is_gone() -> None:
    with collector() as (endpoint, received):
        exporter, provider = _exporting(endpoint)
        _span("vapora.last")
        tracing.use(None)
        provider.shutdown()  # the batch is written, the child sends it and exits
        assert received.span_names() == ["publish vapora.last"]
        assert exporter._child is None
        assert exporter.export([]).name == "FAILURE"


_PARENT = textwrap.dedent(
    """
    import sys, time
    from actors import tracing
    from vapora.config import TelemetryConfig
    from vapora.telemetry import setup

    telemetry = setup(
        TelemetryConfig(
            enabled=True,
            exporter="otlp",
            otlp_endpoint=sys.argv[1],
            metrics=False,
            export_process=True,
        ),
        env={},
    )
    with tracing.publish_span("vapora.from-the-parent"):
        pass
    telemetry.tracer_provider.force_flush()
    child = telemetry.tracer_provider._active_span_processor._span_processors[0].exporter._child
    print(child.process.pid, flush=True)
    time.sleep(60)
    """
)


def test_the_child_leaves_when_its_parent_is_killed_and_never_sees_the_headers() -> None:
    secret = "Authorization=Bearer CHILD-SECRET-TOKEN"
    with collector() as (endpoint, received):
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT, endpoint],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "OTEL_EXPORTER_OTLP_HEADERS": secret},
        )
        try:
            assert parent.stdout is not None
            child_pid = int(parent.stdout.readline())
            assert received.span_names() == ["publish vapora.from-the-parent"]
            cmdline = Path(f"/proc/{child_pid}/cmdline").read_bytes()
            assert b"childexport" in cmdline and b"CHILD-SECRET-TOKEN" not in cmdline
            parent.send_signal(signal.SIGKILL)
            parent.wait(10)
            deadline = time.monotonic() + 10
            while not _exited(child_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _exited(child_pid), "the export child outlived its parent"
        finally:
            parent.kill()
            parent.wait()


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited: gone, or a zombie (an orphan waits for whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_setup_takes_the_child_when_the_config_asks_for_it() -> None:
    assert TelemetryConfig().export_process is False  # opt-in (docs/observability.md)
    for export_process, kind in ((True, ChildSpanExporter), (False, type(None))):
        telemetry = setup(
            TelemetryConfig(
                enabled=True,
                exporter="otlp",
                otlp_endpoint="http://127.0.0.1:9",
                metrics=False,
                export_process=export_process,
            ),
            env={},
        )
        assert telemetry.tracer_provider is not None
        processors = telemetry.tracer_provider._active_span_processor._span_processors
        exporters = [p.exporter for p in processors if isinstance(p, SpanBatcher)]
        assert len(exporters) == 1
        assert isinstance(exporters[0], ChildSpanExporter) == (kind is ChildSpanExporter)
        telemetry.shutdown()
