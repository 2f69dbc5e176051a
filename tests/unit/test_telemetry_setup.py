"""Switching telemetry on from ``[telemetry]`` and the ``OTEL_*`` variables; the exporters; the
Prometheus text format; log lines with task and trace ids."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from actors import tracing
from tests.otlp_collector import collector
from vapora.config import TelemetryConfig
from vapora.telemetry import STATE, TASK_ID, active, setup
from vapora.telemetry.instruments import Instruments
from vapora.telemetry.logs import TaskContextFilter
from vapora.telemetry.prometheus import render
from vapora.telemetry.semconv import V1_41, genai_names


@pytest.fixture(autouse=True)
def switched_off() -> Iterator[None]:
    yield
    tracing.use(None)
    from vapora.telemetry.state import use_meter_provider

    use_meter_provider(None)


def test_off_by_default_and_nothing_is_switched_on() -> None:
    telemetry = setup(TelemetryConfig(), env={})
    assert telemetry.tracer_provider is None and telemetry.meter_provider is None
    assert not active() and not tracing.enabled() and tracing.inject() == {}


def test_otel_sdk_disabled_wins_over_the_file() -> None:
    setup(TelemetryConfig(enabled=True, exporter="console"), env={"OTEL_SDK_DISABLED": "true"})
    assert not active()


def test_jsonl_spans_with_the_service_name_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    telemetry = setup(
        TelemetryConfig(enabled=True, metrics=False),
        env={
            "OTEL_TRACES_EXPORTER": "jsonl",
            "VAPORA_TRACES_JSONL": str(path),
            "OTEL_SERVICE_NAME": "vapora-x",
        },
    )
    assert tracing.enabled() and STATE.metrics is None
    with tracing.publish_span("vapora.complete"), tracing.publish_span("inner"):
        headers = tracing.inject()
    telemetry.shutdown()
    assert not tracing.enabled()
    outer, inner = sorted(
        (json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["start_ns"]
    )
    assert outer["name"] == "publish vapora.complete" and outer["kind"] == "PRODUCER"
    assert inner["parent_span_id"] == outer["span_id"] and inner["trace_id"] == outer["trace_id"]
    assert outer["resource"]["service.name"] == "vapora-x"
    assert outer["attributes"]["messaging.system"] == "nats"
    assert headers["traceparent"].split("-")[2] == inner["span_id"]


def test_the_sample_ratio_and_the_environments_sampler(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    telemetry = setup(
        TelemetryConfig(enabled=True, sample_ratio=0.0), env={}, span_exporters=[spans]
    )
    with tracing.publish_span("x"):
        pass
    telemetry.shutdown()
    assert spans.get_finished_spans() == ()
    spans = InMemorySpanExporter()  # a shut-down exporter takes no more spans
    telemetry = setup(
        TelemetryConfig(enabled=True, sample_ratio=0.0),
        env={"OTEL_TRACES_SAMPLER": "always_on"},
        span_exporters=[spans],
    )
    with tracing.publish_span("x"):
        pass
    telemetry.shutdown()
    assert len(spans.get_finished_spans()) == 1


def test_content_capture_follows_the_file_then_the_genai_variable() -> None:
    setup(TelemetryConfig(enabled=True, capture_content=True), env={}).shutdown()
    assert STATE.capture_content
    env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "NO_CONTENT"}
    setup(TelemetryConfig(enabled=True, capture_content=True), env=env).shutdown()
    assert not STATE.capture_content
    env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_ONLY"}
    setup(TelemetryConfig(enabled=True), env=env).shutdown()
    assert STATE.capture_content


def test_the_semconv_opt_in_selects_v1_41_the_newest_released_set() -> None:
    assert genai_names({}) is V1_41
    assert genai_names({"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"}) is V1_41
    assert V1_41.provider_name == "gen_ai.provider.name"  # not the pre-1.37 gen_ai.system


@pytest.mark.parametrize("export_process", [True, False])
def test_otlp_exports_spans_and_metrics_to_the_collector_in_the_environment(
    export_process: bool,
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with collector() as (endpoint, received):
        telemetry = setup(
            TelemetryConfig(
                enabled=True,
                exporter="otlp",
                otlp_endpoint="http://wrong:1",
                export_process=export_process,
            ),
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        )
        with tracing.publish_span("vapora.otlp-test"):
            pass
        assert STATE.metrics is not None
        STATE.metrics.record_decision("claude", "CodeGeneration", "rules")
        telemetry.shutdown()  # flushes both signals
    paths = {path for path, _ in received}
    assert {"/v1/traces", "/v1/metrics"} <= paths
    assert received.span_names() == ["publish vapora.otlp-test"]
    metrics = b"".join(body for path, body in received if path == "/v1/metrics")
    assert b"vapora_llm_routing_decisions_total" in metrics


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_an_otlp_endpoint_variable_that_is_no_url_is_said_and_not_used(
    variable: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``collector:4318`` (no scheme) failed every export ("No connection adapters were
    found"), the variable never named; the file's ``otlp_endpoint`` is refused in that case."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    monkeypatch.setenv(variable, "collector:4318")  # the SDK's exporter reads it too
    with collector() as (endpoint, received), caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, exporter="otlp", otlp_endpoint=endpoint),
            env={**os.environ, "OTEL_METRICS_EXPORTER": "none"},
        )
        with tracing.publish_span("vapora.otlp-test"):
            pass
        telemetry.shutdown()
    assert received.span_names() == ["publish vapora.otlp-test"]  # to the file's collector
    [said] = [r.getMessage() for r in caplog.records if variable + " " in r.getMessage()]
    assert "collector:4318" in said and "not used" in said


@pytest.mark.parametrize("value", ["grpc", "http/json"])
def test_an_otlp_protocol_other_than_http_protobuf_is_said(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``grpc`` was ignored without a word: an operator pointing at a gRPC collector got no
    traces and no reason."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, exporter="otlp", otlp_endpoint="http://127.0.0.1:9"),
            env={"OTEL_EXPORTER_OTLP_PROTOCOL": value, "OTEL_METRICS_EXPORTER": "otlp"},
        )
    telemetry.shutdown()
    said = [
        r.getMessage() for r in caplog.records if "OTEL_EXPORTER_OTLP_PROTOCOL" in r.getMessage()
    ]
    assert len(said) == 2 and all(repr(value) in w and "http/protobuf" in w for w in said)
    assert {"spans" in w for w in said} == {True, False}  # one for each signal


def test_the_otlp_protocol_http_protobuf_is_said_nothing_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, exporter="otlp", otlp_endpoint="http://127.0.0.1:9"),
            env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
        )
    telemetry.shutdown()
    assert not [r for r in caplog.records if "PROTOCOL" in r.getMessage()]


def test_a_malformed_otlp_header_is_said_without_its_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``Authorization: Bearer <token>`` (a colon for the ``=``): the SDK logged it whole."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization: Bearer OTLP-SECRET-TOKEN")
    with caplog.at_level(logging.DEBUG):
        telemetry = setup(
            TelemetryConfig(enabled=True, exporter="otlp", otlp_endpoint="http://127.0.0.1:9"),
            env={"OTEL_METRICS_EXPORTER": "none"},
        )
        telemetry.shutdown()
    assert "Header format invalid" in caplog.text and "not shown" in caplog.text
    assert "OTLP-SECRET-TOKEN" not in caplog.text


@pytest.mark.parametrize("traces", [True, False])
def test_otlp_without_the_extra_is_said_per_signal_and_never_a_crash(
    traces: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The extra not installed: its modules cannot be imported (None in sys.modules).
    monkeypatch.setitem(sys.modules, "vapora.telemetry.otlp", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.metric_exporter", None)
    with caplog.at_level(logging.WARNING, logger="vapora.telemetry"):
        telemetry = setup(TelemetryConfig(enabled=True, exporter="otlp", traces=traces), env={})
    try:
        said = [r.getMessage() for r in caplog.records if "optional extra" in r.getMessage()]
        expected = ["spans", "metrics"] if traces else ["metrics"]
        assert [m.rsplit("; ", 1)[1] for m in said] == [f"{s} are not exported" for s in expected]
        assert all("pip install 'vapora[otlp]'" in m for m in said)
        assert STATE.metrics is None  # no reader left to read them: none recorded
    finally:
        telemetry.shutdown()


def test_prometheus_text_of_counters_histograms_and_gauges() -> None:
    reader = InMemoryMetricReader()
    instruments = Instruments(MeterProvider(metric_readers=[reader]).get_meter("t"), V1_41)
    instruments.record_fallback("claude", "openai", "transient")
    instruments.record_fallback("claude", "openai", "transient")
    instruments.latency.record(0.3, "weird", {"provider": 'we"ird\\'})
    instruments.record_tier("NearThreshold")
    text = render(reader.get_metrics_data())
    assert "# TYPE vapora_llm_fallback_triggers_total counter" in text
    assert (
        'vapora_llm_fallback_triggers_total{from_provider="claude",reason="transient",'
        'to_provider="openai"} 2'
    ) in text
    assert "# TYPE vapora_llm_provider_latency_seconds histogram" in text
    assert 'vapora_llm_provider_latency_seconds_bucket{provider="we\\"ird\\\\",le="0.25"} 0' in text
    assert 'vapora_llm_provider_latency_seconds_bucket{provider="we\\"ird\\\\",le="0.5"} 1' in text
    assert 'vapora_llm_provider_latency_seconds_bucket{provider="we\\"ird\\\\",le="+Inf"} 1' in text
    assert 'vapora_llm_provider_latency_seconds_count{provider="we\\"ird\\\\"} 1' in text
    assert "# TYPE vapora_budget_tier gauge\nvapora_budget_tier 1\n" in text


def test_log_lines_carry_the_task_and_the_trace() -> None:
    import io

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from vapora.telemetry import logs

    # A logger with a handler of its own, given the filter and the format by install() (what
    # setup() does to the root logger's handlers), and read as the lines it writes.
    out = io.StringIO()
    logger = logging.getLogger("vapora.test-lines")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    try:
        logs.install(logger)
        assert any(isinstance(f, TaskContextFilter) for f in handler.filters)
        telemetry = setup(
            TelemetryConfig(enabled=True), env={}, span_exporters=[InMemorySpanExporter()]
        )
        logger.info("outside")
        token = TASK_ID.set("task-7")
        with tracing.publish_span("x") as span:
            logger.info("inside")
        TASK_ID.reset(token)
        telemetry.shutdown()
    finally:
        logger.removeHandler(handler)
    outside, inside = out.getvalue().splitlines()
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert re.fullmatch(r"\S+ \S+ INFO vapora\.test-lines task=- trace=-: outside", outside)
    assert re.fullmatch(
        rf"\S+ \S+ INFO vapora\.test-lines task=task-7 trace={trace_id}: inside", inside
    )


def test_setup_gives_the_root_loggers_handlers_the_task_and_trace_format() -> None:
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        setup(TelemetryConfig(), env={})  # even with telemetry off: the ids are "-"
        assert any(isinstance(f, TaskContextFilter) for f in handler.filters)
        assert handler.formatter is not None
        assert handler.formatter._fmt is not None and "task=%(task_id)s" in handler.formatter._fmt
        assert "trace=%(trace_id)s" in handler.formatter._fmt
    finally:
        root.removeHandler(handler)


def test_a_task_id_with_a_newline_cannot_write_a_log_line_of_its_own() -> None:
    """Requests refuse such ids; one read from an event anyone could append is escaped."""
    record = logging.LogRecord("vapora.test", logging.INFO, __file__, 1, "routed", (), None)
    token = TASK_ID.set("x\n2026-11-27 ERROR vapora.budget task=y: forged")
    try:
        TaskContextFilter().filter(record)
    finally:
        TASK_ID.reset(token)
    assert "\n" not in record.task_id and "\\n" in record.task_id  # type: ignore[attr-defined]


class _Subscription:
    """A stream's subscription, as ``TextStream.aclose`` uses it."""

    subject = "_INBOX.x"

    async def unsubscribe(self) -> None:
        pass


def test_a_stream_closed_while_its_cancel_is_cut_still_ends_its_span() -> None:
    """``aclose`` ended the stream's span only after awaiting the cancel's publish: a caller's
    timeout at that await left it never ended (never exported), its child cancel span
    exported without it."""
    import asyncio

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from vapora.client import TextStream
    from vapora.telemetry.messaging import start_request

    exporter = InMemorySpanExporter()
    telemetry = setup(
        TelemetryConfig(enabled=True),
        env={},
        span_exporters=[exporter],
        metric_readers=[InMemoryMetricReader()],
    )

    class Stalled:
        async def publish(self, subject: str, data: bytes, headers: object = None) -> None:
            await asyncio.sleep(10)  # nats-py flushing a full buffer

    async def main() -> None:
        stream = TextStream(Stalled(), b"{}", 1.0)  # type: ignore[arg-type]
        stream._sub = _Subscription()  # type: ignore[assignment]
        stream._span, _ = start_request("vapora.stream")
        closing = asyncio.ensure_future(stream.aclose())
        await asyncio.sleep(0.05)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing

    asyncio.run(main())
    telemetry.shutdown()
    names = [s.name for s in exporter.get_finished_spans()]
    assert "publish vapora.stream" in names, names


def test_the_audits_telemetry_serves_no_metrics(tmp_path: Path) -> None:
    """``vapora audit`` set telemetry up as the deployment's actors do, /metrics port included:
    where they serve it (the shipped docker setup) it exited 2, "address already in use"."""
    import socket

    from vapora.cli import _telemetry
    from vapora.config import parse_config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = (
            '[[providers]]\nname = "ollama"\nkind = "ollama"\nmodel = "llama3.2"\n'
            f"[telemetry]\nenabled = true\nprometheus_port = {port}\n"
            'prometheus_host = "127.0.0.1"\n'
        )
        config = parse_config(text, source="t.toml", at=datetime.now(UTC))
        telemetry = _telemetry(config, "vapora-audit", metrics=False)
        try:
            assert telemetry.meter_provider is None and telemetry.tracer_provider is not None
        finally:
            telemetry.shutdown()


def test_a_cancel_without_a_span_of_vaporas_carries_the_streams_own_context() -> None:
    """With vapora's tracing off (or the trace sampled out), the cancel carried the context
    current when the stream was closed: under another span (or from the collector) it went
    into an unrelated trace. It carries the stream's own."""
    import asyncio

    from vapora.client import TextStream

    sent: list[object] = []
    streams_own = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}

    class Recording:
        async def publish(self, subject: str, data: bytes, headers: object = None) -> None:
            sent.append(headers)

    async def main() -> None:
        stream = TextStream(Recording(), b"{}", 1.0)  # type: ignore[arg-type]
        stream._sub = _Subscription()  # type: ignore[assignment]
        stream._trace_headers = streams_own
        await stream.aclose()

    asyncio.run(main())
    assert sent == [streams_own]
