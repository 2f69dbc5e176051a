"""The standard ``OTEL_*`` variables as a deployment sets them: several exporters, the Prometheus
exporter, the resource's service name, a sampler argument vapora cannot use, a propagator that
is not installed. A value vapora cannot use is named in the log and never stops the process."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

from actors import tracing
from vapora.config import TelemetryConfig
from vapora.telemetry import STATE, sdk, setup
from vapora.telemetry.state import use_meter_provider

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def switched_off() -> Iterator[None]:
    yield
    tracing.use(None)
    use_meter_provider(None)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- OTEL_TRACES_SAMPLER_ARG -----------------------------------------------------------------


@pytest.mark.parametrize("arg", ["5", "nan", "-0.5", "10%"])
@pytest.mark.parametrize("sampler", ["always_on", "parentbased_always_off"])
def test_the_sampler_arg_is_not_read_by_a_sampler_without_a_ratio(
    sampler: str, arg: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg}
    with caplog.at_level(logging.WARNING):
        telemetry = setup(TelemetryConfig(enabled=True, metrics=False), env=env)
    assert telemetry.tracer_provider is not None
    name = telemetry.tracer_provider.sampler.get_description()
    telemetry.shutdown()
    assert name.lower().startswith(("alwayson", "parentbased{root:alwaysoff"))
    assert _warnings(caplog) == []


@pytest.mark.parametrize("arg", ["10%", "5", "nan", "inf", "-0.1", "one"])
@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio"])
def test_a_ratio_samplers_unusable_arg_is_said_and_the_files_ratio_used(
    sampler: str, arg: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg}
    with caplog.at_level(logging.WARNING):
        telemetry = setup(TelemetryConfig(enabled=True, metrics=False, sample_ratio=0.25), env=env)
    assert telemetry.tracer_provider is not None
    used = telemetry.tracer_provider.sampler
    telemetry.shutdown()
    ratio = used._root if isinstance(used, ParentBased) else used
    assert isinstance(ratio, TraceIdRatioBased) and ratio.rate == 0.25
    [said] = _warnings(caplog)
    assert "OTEL_TRACES_SAMPLER_ARG" in said and repr(arg) in said and "0.25" in said


def test_a_ratio_samplers_valid_arg_is_the_ratio(caplog: pytest.LogCaptureFixture) -> None:
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    with caplog.at_level(logging.WARNING):
        telemetry = setup(TelemetryConfig(enabled=True, metrics=False, sample_ratio=0.5), env=env)
    assert telemetry.tracer_provider is not None
    assert "TraceIdRatioBased{0.1}" in telemetry.tracer_provider.sampler.get_description()
    telemetry.shutdown()
    assert _warnings(caplog) == []


def test_without_a_sampler_the_file_ratio_is_used_whatever_the_arg() -> None:
    telemetry = setup(
        TelemetryConfig(enabled=True, metrics=False), env={"OTEL_TRACES_SAMPLER_ARG": "5"}
    )
    assert telemetry.tracer_provider is not None
    assert telemetry.tracer_provider.sampler.get_description() == (
        ParentBased(ALWAYS_ON).get_description()
    )
    telemetry.shutdown()


# --- OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER --------------------------------------------


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What the console span exporter prints (it binds ``sys.stdout`` when the SDK is imported,
    before any capture)."""
    out = io.StringIO()
    monkeypatch.setattr(sdk, "ConsoleSpanExporter", lambda: ConsoleSpanExporter(out=out))
    return out


def _exported_by_each(tmp_path: Path, value: str, console: io.StringIO) -> tuple[list[str], str]:
    """The spans the JSON-lines exporter wrote, and what the console exporter printed."""
    path = tmp_path / "spans.jsonl"
    env = {"OTEL_TRACES_EXPORTER": value, "VAPORA_TRACES_JSONL": str(path)}
    telemetry = setup(TelemetryConfig(enabled=True, metrics=False), env=env)
    with tracing.publish_span("vapora.complete"):
        pass
    telemetry.shutdown()
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["name"] for line in lines], console.getvalue()


def test_several_span_exporters_are_each_installed(
    tmp_path: Path, console: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        jsonl, printed = _exported_by_each(tmp_path, " jsonl , console ", console)
    assert jsonl == ["publish vapora.complete"]
    assert '"name": "publish vapora.complete"' in printed
    assert _warnings(caplog) == []


def test_an_unknown_span_exporter_is_said_and_the_others_installed(
    tmp_path: Path, console: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        jsonl, printed = _exported_by_each(tmp_path, "zipkin,jsonl", console)
    assert jsonl == ["publish vapora.complete"] and printed == ""
    [said] = _warnings(caplog)
    assert "OTEL_TRACES_EXPORTER" in said and "'zipkin'" in said


def test_none_is_no_span_exporter_even_when_the_file_names_one(
    tmp_path: Path, console: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.jsonl"
    config = TelemetryConfig(enabled=True, metrics=False, exporter="jsonl", jsonl_path=str(path))
    with caplog.at_level(logging.WARNING):
        telemetry = setup(config, env={"OTEL_TRACES_EXPORTER": "none"})
    with tracing.publish_span("vapora.complete"):
        pass
    telemetry.shutdown()
    assert not path.exists() and console.getvalue() == ""
    assert _warnings(caplog) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_prometheus_metrics_exporter_serves_metrics(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    env = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
    }
    with caplog.at_level(logging.WARNING):
        telemetry = setup(TelemetryConfig(enabled=True, traces=False), env=env)
    try:
        assert telemetry.metrics_url == f"http://127.0.0.1:{port}/metrics"
        assert STATE.metrics is not None
        STATE.metrics.record_decision("claude", "CodeGeneration", "rules")
        with urllib.request.urlopen(telemetry.metrics_url, timeout=5) as response:
            assert response.status == 200
            assert b"vapora_llm_routing_decisions_total{" in response.read()
    finally:
        telemetry.shutdown()
    assert _warnings(caplog) == []


def test_the_prometheus_exporter_uses_the_files_port_and_host() -> None:
    port = _free_port()
    config = TelemetryConfig(
        enabled=True, traces=False, prometheus_port=port, prometheus_host="127.0.0.1"
    )
    telemetry = setup(config, env={"OTEL_METRICS_EXPORTER": "otlp,prometheus"})
    try:
        assert telemetry.metrics_url == f"http://127.0.0.1:{port}/metrics"
    finally:
        telemetry.shutdown()


def test_an_unknown_metrics_exporter_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, traces=False), env={"OTEL_METRICS_EXPORTER": "jsonl"}
        )
    telemetry.shutdown()
    assert telemetry.meter_provider is None  # nothing would read them
    [said] = _warnings(caplog)
    assert "OTEL_METRICS_EXPORTER" in said and "'jsonl'" in said


# --- OTEL_RESOURCE_ATTRIBUTES ----------------------------------------------------------------


def _resource(config: TelemetryConfig, env: dict[str, str]) -> dict[str, object]:
    telemetry = setup(config, env=env, span_exporters=[InMemorySpanExporter()])
    assert telemetry.tracer_provider is not None
    attributes: dict[str, object] = dict(telemetry.tracer_provider.resource.attributes)
    telemetry.shutdown()
    return attributes


def test_the_resource_attributes_service_name_beats_the_default_and_the_file() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout%20llm,deployment.environment=prod"}
    for config in (TelemetryConfig(), TelemetryConfig(service_name="from-file")):
        attributes = _resource(config, env)
        assert attributes["service.name"] == "checkout llm"
        assert attributes["deployment.environment"] == "prod"


def test_otel_service_name_beats_the_resource_attributes() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}
    assert _resource(TelemetryConfig(), env)["service.name"] == "b"


def test_the_default_service_name_when_no_variable_names_one() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"}
    assert _resource(TelemetryConfig(), env)["service.name"] == "vapora"
    assert _resource(TelemetryConfig(service_name="f"), env)["service.name"] == "f"


# --- OTEL_PROPAGATORS ------------------------------------------------------------------------

_INJECT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
import vapora.client  # the import every command makes, telemetry on or off
from opentelemetry.sdk.trace import TracerProvider
from vapora.telemetry.messaging import request_span
tracer = TracerProvider().get_tracer("a-service")
with tracer.start_as_current_span("caller") as span:
    with request_span("vapora.complete") as headers:
        print(headers["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}")
"""


@pytest.mark.parametrize(
    ("value", "used"),
    [("b3multi", "TraceContextTextMapPropagator"), ("b3, tracecontext", "TraceContext")],
)
def test_an_uninstalled_propagator_is_said_and_trace_context_still_travels(
    value: str, used: str
) -> None:
    env = {**os.environ, "OTEL_PROPAGATORS": value, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _INJECT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    [said] = [line for line in done.stderr.splitlines() if "OTEL_PROPAGATORS" in line]
    assert repr(value) in said and "b3" in said and used in said


_HOPS = """
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import TracerProvider
from vapora.telemetry import w3c
from vapora.telemetry.messaging import request_span
tracer = TracerProvider().get_tracer("a-service")
token = context.attach(baggage.set_baggage("user", "alice"))  # through the propagators' path
with tracer.start_as_current_span("caller") as span:
    with request_span("vapora.complete") as headers:
        sent = dict(headers)
context.detach(token)
parent = trace.get_current_span(w3c.extract(sent)).get_span_context()
print(sent["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}")
print(parent.trace_id == span.get_span_context().trace_id, "baggage" in sent)
"""


@pytest.mark.parametrize("value", ["none", "baggage"])
def test_a_propagator_set_without_trace_context_still_makes_one_trace_per_task(
    value: str,
) -> None:
    """``OTEL_PROPAGATORS=none`` (a valid value) split every task into a trace per actor: no
    hop carried the context, and nothing said so."""
    env = {**os.environ, "OTEL_PROPAGATORS": value, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _HOPS], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", str(value == "baggage")]


def test_a_trace_context_header_past_the_w3c_limits_is_not_read_nor_logged_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The propagators log a value they refuse whole: a caller's 500 KB baggage made a 534 KB
    # warning line per request.
    from vapora.telemetry import w3c

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"traceparent": parent, "baggage": "k=" + "v" * 500_000, "tracestate": "x" * 3000}
    context = w3c.extract(headers)
    from opentelemetry import trace

    span = trace.get_current_span(context).get_span_context()
    assert span.trace_id == 0x0AF7651916CD43DD8448EB211C80319C  # the parent is still read
    assert all(len(record.getMessage()) < 300 for record in caplog.records)


# --- values the SDK refuses or vapora cannot read ------------------------------------------------


def test_an_unknown_exemplar_filter_is_said_and_does_not_stop_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SDK raised ValueError from MeterProvider: ``vapora up`` died with a traceback."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, traces=False),
            env={"OTEL_METRICS_EXEMPLAR_FILTER": "bogus"},
            metric_readers=[InMemoryMetricReader()],
        )
    assert telemetry.meter_provider is not None
    telemetry.shutdown()
    assert any("OTEL_METRICS_EXEMPLAR_FILTER" in w and "bogus" in w for w in _warnings(caplog))


def test_an_otlp_exporter_the_sdk_refuses_is_said_and_does_not_stop_the_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential provider that is not installed: the SDK's exporter raised RuntimeError."""
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER", "nope")
    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True, exporter="otlp"),
            env={"OTEL_METRICS_EXPORTER": "otlp"},
        )
    telemetry.shutdown()
    said = [w for w in _warnings(caplog) if "could not be made" in w]
    assert {w.split()[3] for w in said} == {"span", "metric"}, said


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_SDK_DISABLED", "maybe"),
        ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "yes"),
    ],
)
def test_a_switch_that_is_neither_on_nor_off_is_said(
    name: str, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        telemetry = setup(
            TelemetryConfig(enabled=True),
            env={name: value},
            span_exporters=[InMemorySpanExporter()],
        )
    telemetry.shutdown()
    assert any(name in w and value in w for w in _warnings(caplog)), _warnings(caplog)


def test_a_blank_service_name_is_no_service_name() -> None:
    assert _resource(TelemetryConfig(), {"OTEL_SERVICE_NAME": "  "})["service.name"] == "vapora"
