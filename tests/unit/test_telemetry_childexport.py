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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceFlags

from actors import tracing
from tests.otlp_collector import collector
from tests.unit.test_telemetry_spans import ODD_ATTRIBUTES
from tests.unit.test_telemetry_spans import _varied_spans as varied_spans
from vapora.config import TelemetryConfig
from vapora.telemetry import childexport, setup
from vapora.telemetry.childexport import ChildSpanExporter, _frames, _Rebuilder
from vapora.telemetry.export import SpanBatcher
from vapora.telemetry.otlp import encode_spans

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "vapora-t", "n": 3}, "https://r"))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    yield memory
    tracing.use(None)


def _sdk_spans() -> list[ReadableSpan]:
    """The SDK's own spans, one of them with attributes dropped by its limits."""
    memory = InMemorySpanExporter()
    limits = SpanLimits(
        max_span_attributes=3, max_event_attributes=1, max_link_attributes=1, max_events=5
    )
    provider = TracerProvider(resource=Resource({"service.name": "x"}), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("other", "1.2.3", schema_url="https://scope/1")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(5, 6, True, TraceFlags(1)))
    )
    with tracer.start_as_current_span("root", context=parent, attributes=ODD_ATTRIBUTES) as root:
        root.record_exception(ValueError("bad"))
        root.add_event("retry", {"attempt": 2, "why": "overloaded", "after_ms": 10})
        link = Link(root.get_span_context(), {"a": "b", "c": "d"})
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT, links=[link]) as child:
            child.set_status(StatusCode.OK)
    return list(memory.get_finished_spans())


def _through_the_pipe(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """``spans`` as the parent writes them and the child reads them back."""
    exporter = ChildSpanExporter("http://127.0.0.1:9")
    child = SimpleNamespace(resources={}, scopes={})
    data, _, _, packed = exporter._packed(child, spans)  # type: ignore[arg-type]
    assert packed == len(spans)
    exporter.shutdown()
    rebuilder, rebuilt = _Rebuilder(), []
    for item in _frames(io.BytesIO(data)):
        if item[0] == "spans":
            rebuilt.extend(rebuilder.span(row) for row in item[1])
        else:
            rebuilder.define(item)
    return rebuilt


def test_vapora_spans_reach_the_collector_as_the_same_bytes(
    spans: InMemorySpanExporter,
) -> None:
    varied_spans()
    made = list(spans.get_finished_spans())
    assert len(made) == 4
    assert encode_spans(_through_the_pipe(made)) == encode_spans(made)


def test_the_sdks_spans_reach_the_collector_as_the_same_bytes() -> None:
    made = _sdk_spans()
    child, root = made
    # The shapes the rows carry their counts for: attributes dropped by the limits from the
    # span, from an event and from a link.
    assert root.dropped_attributes > 0 and root.events[-1].dropped_attributes == 2
    assert child.links[0].dropped_attributes == 1
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
        if export_process:  # its writes' deadline is the batch processor's export timeout
            assert exporters[0].timeout_s == 30.0
        telemetry.shutdown()
    with_timeout = setup(
        TelemetryConfig(enabled=True, exporter="otlp", metrics=False, export_process=True),
        env={"OTEL_BSP_EXPORT_TIMEOUT": "2500"},
    )
    assert with_timeout.tracer_provider is not None
    processors = with_timeout.tracer_provider._active_span_processor._span_processors
    assert [p.exporter.timeout_s for p in processors if isinstance(p, SpanBatcher)] == [2.5]
    with_timeout.shutdown()


def _batch(exporter: ChildSpanExporter, names: list[str], **attributes: object) -> list[object]:
    """Spans made and ended now, handed to ``exporter`` as one batch; the export's result."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "vapora-t"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    try:
        for name in names:
            with tracing.publish_span(name) as span:
                for key, value in attributes.items():
                    span.set_attribute(key, value)  # type: ignore[arg-type]
    finally:
        tracing.use(None)
    return [exporter.export(list(memory.get_finished_spans()))]


def test_a_child_that_keeps_dying_is_counted_said_and_then_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that exits at start (a broken install, an OOM kill) was restarted for every
    batch, its batches counted sent and the flush said done, with nothing exported."""
    monkeypatch.setattr(childexport, "CHILD_ARGS", ("-c", "import sys; sys.exit(3)"))
    with collector() as (endpoint, received):
        exporter = ChildSpanExporter(f"{endpoint}/v1/traces")
        with caplog.at_level(logging.WARNING, "vapora.telemetry"):
            for n in range(childexport.MAX_DEATHS + 2):
                _batch(exporter, [f"vapora.try-{n}"])
                time.sleep(0.3)  # the child exits meanwhile
                if n == 0:
                    assert exporter.force_flush(5_000) is False  # its spans were lost
        exporter.shutdown()
    assert "spans lost with it" in caplog.text and "exported from this process" in caplog.text
    assert exporter.failed >= childexport.MAX_DEATHS  # every span written to a dead child
    # Once it stopped using children, the batches went out from this process.
    assert received.span_names()[-1] == f"publish vapora.try-{childexport.MAX_DEATHS + 1}"


def test_a_child_that_stops_reading_is_stopped_and_its_batch_counted_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batcher's thread blocked on a full pipe for ever, holding the lock that a flush and
    the shutdown wait for: both hung."""
    monkeypatch.setattr(childexport, "CHILD_ARGS", ("-c", "import time; time.sleep(60)"))
    exporter = ChildSpanExporter("http://127.0.0.1:9/v1/traces", timeout_s=0.5)
    started = time.monotonic()
    result = _batch(exporter, [f"vapora.big-{n}" for n in range(8)], payload="x" * 20_000)
    assert result == [SpanExportResult.FAILURE] and exporter.failed == 8
    assert exporter._child is None  # each child that did not read was stopped
    exporter.shutdown()
    assert time.monotonic() - started < 10


def test_a_shutdown_while_the_writer_is_stuck_stops_the_child_in_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(childexport, "CHILD_ARGS", ("-c", "import time; time.sleep(60)"))
    exporter = ChildSpanExporter("http://127.0.0.1:9/v1/traces", timeout_s=1.0)
    results: list[object] = []
    writer = threading.Thread(
        target=lambda: results.extend(
            _batch(exporter, [f"vapora.big-{n}" for n in range(8)], payload="x" * 20_000)
        )
    )
    writer.start()
    time.sleep(0.3)  # the writer is blocked on the child now
    stuck = exporter._child
    assert stuck is not None
    started = time.monotonic()
    assert exporter.force_flush(300) is False  # the lock is the writer's: not waited out
    exporter.shutdown()
    writer.join(10)
    assert time.monotonic() - started < 5 and not writer.is_alive()
    assert results == [SpanExportResult.FAILURE] and exporter.failed == 8
    assert stuck.process.poll() is not None and exporter._child is None


def test_a_span_that_cannot_be_packed_is_left_out_and_said_and_the_next_batch_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value of another type (a Path) or a lone surrogate failed the batch's packing after
    the resource was marked sent: the child then failed every later batch."""
    with collector() as (endpoint, received):
        exporter = ChildSpanExporter(f"{endpoint}/v1/traces")
        with caplog.at_level(logging.WARNING, "vapora.telemetry"):
            _batch(exporter, ["vapora.path"], where=Path("/tmp"))
            _batch(exporter, ["vapora.surrogate"], text="\udcff")
        _batch(exporter, ["vapora.good"])
        assert exporter.force_flush(10_000)
        exporter.shutdown()
    assert received.span_names() == ["publish vapora.good"]
    assert exporter.failed == 2 and "cannot be sent" in caplog.text


def test_a_forked_process_lets_go_of_its_parents_child() -> None:
    """The forked process kept the parent's pipe open: the parent's child never saw its input
    end, and the parent's shutdown waited 10 s and killed it."""
    with collector() as (endpoint, received):
        exporter = ChildSpanExporter(f"{endpoint}/v1/traces")
        _batch(exporter, ["vapora.before-fork"])
        assert exporter.force_flush(10_000)
        pid = os.fork()
        if pid == 0:  # the forked process: lives on while the parent shuts down
            time.sleep(20)
            os._exit(0)
        try:
            started = time.monotonic()
            exporter.shutdown()
            assert time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert received.span_names() == ["publish vapora.before-fork"]


def test_export_process_without_otlp_is_said_to_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "vapora.telemetry"):
        telemetry = setup(
            TelemetryConfig(
                enabled=True,
                exporter="jsonl",
                jsonl_path=str(tmp_path / "spans.jsonl"),
                metrics=False,
                export_process=True,
            ),
            env={},
        )
        telemetry.shutdown()
    assert "applies to the OTLP exporter only" in caplog.text and "jsonl" in caplog.text


def test_a_bad_export_process_value_is_a_config_error_naming_the_key() -> None:
    from datetime import UTC, datetime

    from vapora.config import parse_config
    from vapora.errors import ConfigError

    text = "[[providers]]\nname = 'ollama'\nmodel = 'llama2'\n[telemetry]\nexport_process = 'yes'\n"
    with pytest.raises(ConfigError, match="export_process"):
        parse_config(text, source="t.toml", at=datetime.now(UTC))
