"""Switching telemetry on: the OpenTelemetry SDK from ``[telemetry]`` and ``OTEL_*`` variables.

One call after the config is loaded, one shutdown at exit (``vapora up`` / ``vapora actor`` do
this)::

    telemetry = setup(config.telemetry, env=os.environ, service_name="vapora")
    ...
    telemetry.shutdown()          # flushes exporters, stops /metrics, switches everything off

Where the environment and the file both say something, the environment wins (deployments set
it): ``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_EXPORTER`` (comma-separated: ``none``, ``console``, ``otlp``, ``jsonl``) and
``OTEL_METRICS_EXPORTER`` (``none``, ``console``, ``otlp``, ``prometheus``: the ``/metrics``
endpoint, on ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT`` if set), ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` and its ``_TRACES_`` / ``_METRICS_``
variants (the OTLP exporters read headers and timeouts from the process environment
themselves), ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` and
``OTEL_SEMCONV_STABILITY_OPT_IN``. OTLP needs the optional extra (``pip install 'vapora[otlp]'``);
without it an ``otlp`` exporter is reported once in the log and skipped, never a crash. A value
vapora cannot use (an unknown exporter, a sampler ratio that is not a number in 0..1) is named
in the log with its variable and replaced by the file's setting; it never stops the process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from vapora.config import TelemetryConfig, http_url_problem
from vapora.errors import ConfigError
from vapora.telemetry import logs
from vapora.telemetry.export import SpanBatcher
from vapora.telemetry.jsonl import JsonLinesSpanExporter
from vapora.telemetry.prometheus import MetricsEndpoint
from vapora.telemetry.semconv import genai_names
from vapora.telemetry.state import use_meter_provider, use_options, use_tracer_provider

__all__ = ["Telemetry", "setup"]

log = logging.getLogger("vapora.telemetry")

_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURE_ON = {"SPAN_ONLY", "SPAN_AND_EVENT", "TRUE", "1"}
_CAPTURE_OFF = {"NO_CONTENT", "EVENT_ONLY", "FALSE", "0"}
_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"
_SPAN_EXPORTERS = ("console", "jsonl", "otlp")
_METRIC_EXPORTERS = ("console", "otlp", "prometheus")
#: The OpenTelemetry Prometheus exporter's default port (``OTEL_EXPORTER_PROMETHEUS_PORT``).
_PROMETHEUS_PORT = 9464


@dataclass
class Telemetry:
    """What :func:`setup` switched on; :meth:`shutdown` flushes and switches it all off."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    prometheus_reader: InMemoryMetricReader | None = None

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_endpoint is None:
            return None
        return f"http://127.0.0.1:{self.metrics_endpoint.port}/metrics"

    def activate(self) -> None:
        """Make this the process's telemetry again (benchmarks switch between several)."""
        use_tracer_provider(self.tracer_provider)
        use_meter_provider(self.meter_provider)

    def shutdown(self) -> None:
        use_tracer_provider(None)
        use_meter_provider(None)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name, "").strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    if value:
        log.warning("telemetry: %s=%r is neither true nor false; ignored", name, value[:100])
    return None


def setup(
    config: TelemetryConfig,
    *,
    env: Mapping[str, str],
    service_name: str = "vapora",
    span_exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """Switch on what ``config`` and ``env`` ask for (see the module doc); tests add their own
    in-memory ``span_exporters`` (exported synchronously) and ``metric_readers``."""
    logs.install()
    telemetry = Telemetry()
    enabled = config.enabled or bool(span_exporters or metric_readers)
    if not enabled or _flag(env, "OTEL_SDK_DISABLED"):
        use_tracer_provider(None)
        use_meter_provider(None)
        return telemetry
    use_options(capture_content=_capture(config, env), names=genai_names(env))
    resource = Resource.create(_resource_attributes(config, env, service_name))
    if config.traces or span_exporters:
        telemetry.tracer_provider = _tracer_provider(config, env, resource, span_exporters)
    if config.metrics or metric_readers:
        _meter_provider(telemetry, config, env, resource, metric_readers)
    use_tracer_provider(telemetry.tracer_provider)
    use_meter_provider(telemetry.meter_provider)
    return telemetry


def _resource_attributes(
    config: TelemetryConfig, env: Mapping[str, str], default: str
) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` (``key=value,...``, values percent-decoded) with
    ``service.name``: ``OTEL_SERVICE_NAME``, else the one in ``OTEL_RESOURCE_ATTRIBUTES``, else
    the file's ``service_name``, else ``default``."""
    attributes: dict[str, str] = {}
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = (
        env.get("OTEL_SERVICE_NAME", "").strip()  # blank: not set
        or attributes.get("service.name")
        or config.service_name
        or default
    )
    return attributes


def _capture(config: TelemetryConfig, env: Mapping[str, str]) -> bool:
    raw = env.get(_CAPTURE_ENV, "").strip()
    value = raw.upper()
    if value in _CAPTURE_ON:
        return True
    if value in _CAPTURE_OFF:
        return False
    if value:
        log.warning(
            "telemetry: %s=%r is none of %s; the file's capture_content is used",
            _CAPTURE_ENV,
            raw[:100],
            ", ".join(sorted(_CAPTURE_ON | _CAPTURE_OFF)),
        )
    return config.capture_content


_FIXED_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": ParentBased(ALWAYS_ON),
    "parentbased_always_off": ParentBased(ALWAYS_OFF),
}


def _sampler(config: TelemetryConfig, env: Mapping[str, str]) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (``_ARG``: the ratio, read for the ratio samplers only) if set,
    else ``sample_ratio``, parent-based."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in _FIXED_SAMPLERS:
        return _FIXED_SAMPLERS[name]
    if name in ("traceidratio", "parentbased_traceidratio"):
        ratio = TraceIdRatioBased(_sampler_ratio(config, env))
        return ratio if name == "traceidratio" else ParentBased(ratio)
    if name:
        log.warning("telemetry: unknown OTEL_TRACES_SAMPLER %r; using sample_ratio", name)
    if config.sample_ratio >= 1.0:
        return ParentBased(ALWAYS_ON)  # the same decisions, without hashing trace ids
    return ParentBased(TraceIdRatioBased(config.sample_ratio))


def _sampler_ratio(config: TelemetryConfig, env: Mapping[str, str]) -> float:
    """``OTEL_TRACES_SAMPLER_ARG`` as a ratio (1.0 when unset, as the SDK has it); a value that
    is not a number in 0..1 is named in the log and the file's ``sample_ratio`` used."""
    value = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not value:
        return 1.0
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if 0.0 <= ratio <= 1.0:  # NaN fails this too
        return ratio
    log.warning(
        "telemetry: OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in 0..1; using sample_ratio %g",
        value,
        config.sample_ratio,
    )
    return config.sample_ratio


def _exporters(
    config: TelemetryConfig, env: Mapping[str, str], variable: str, known: tuple[str, ...]
) -> list[str]:
    """The exporters a signal is asked for: ``variable`` (comma-separated) if set, else the
    file's ``exporter``; ``none`` adds none, and a name not in ``known`` is said and skipped."""
    value = env.get(variable, "").strip().lower()
    if not value:
        return [config.exporter] if config.exporter in known else []
    names: list[str] = []
    for name in (n.strip() for n in value.split(",")):
        if name in known and name not in names:
            names.append(name)
        elif name and name != "none" and name not in names:
            log.warning(
                "telemetry: %s=%r: unknown exporter %r skipped (known: none, %s)",
                variable,
                value,
                name,
                ", ".join(known),
            )
    return names


def _tracer_provider(
    config: TelemetryConfig,
    env: Mapping[str, str],
    resource: Resource,
    extra: Sequence[SpanExporter],
) -> TracerProvider:
    provider = TracerProvider(resource=resource, sampler=_sampler(config, env))
    for exporter in extra:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    kinds = _exporters(config, env, _TRACES_EXPORTER, _SPAN_EXPORTERS)
    if config.export_process and "otlp" not in kinds:
        log.warning(
            "telemetry: export_process = true applies to the OTLP exporter only, and spans go "
            "to %s: it changes nothing",
            ", ".join(kinds) or "no exporter",
        )
    for kind in kinds:
        configured = _span_exporter(kind, config, env)
        if configured is not None:
            provider.add_span_processor(SpanBatcher(configured, env={**os.environ, **env}))
    return provider


def _span_exporter(
    kind: str, config: TelemetryConfig, env: Mapping[str, str]
) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "jsonl":
        path = env.get("VAPORA_TRACES_JSONL") or config.jsonl_path
        if not path:
            log.warning("telemetry: the jsonl exporter needs telemetry.jsonl_path; no spans out")
            return None
        return JsonLinesSpanExporter(path)
    return _otlp_spans(config, env)


def _otlp_endpoint(config: TelemetryConfig, env: Mapping[str, str], signal: str) -> str | None:
    """The collector URL for ``signal`` (``TRACES``/``METRICS``): the signal's own variable as
    it is, else the general variable or the file's ``otlp_endpoint`` plus ``/v1/<signal>``;
    None: the exporter's default (``http://localhost:4318``)."""
    _protocol(env, signal)
    own_name, general_name = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
    own = _endpoint_variable(env, own_name)
    if own:
        return own
    base = _endpoint_variable(env, general_name) or config.otlp_endpoint
    if not base and (env.get(own_name) or env.get(general_name)):
        base = _DEFAULT_COLLECTOR  # given explicitly: the SDK would read the refused variable
    return f"{base.rstrip('/')}/v1/{signal.lower()}" if base else None


_DEFAULT_COLLECTOR = "http://localhost:4318"


def _endpoint_variable(env: Mapping[str, str], name: str) -> str | None:
    """Variable ``name``'s collector URL, or None: unset, or not an ``http(s)://host`` URL (named
    in the log: ``collector:4318`` failed every export, the variable never named)."""
    value = env.get(name)
    if not value:
        return None
    problem = http_url_problem(value)
    if problem is None:
        return value
    log.warning("telemetry: %s %s; it is not used", name, problem)
    return None


_PROTOCOL = "http/protobuf"


def _protocol(env: Mapping[str, str], signal: str) -> None:
    """Say that a protocol other than OTLP over HTTP/protobuf is not spoken: ``grpc`` or
    ``http/json`` in ``OTEL_EXPORTER_OTLP_[<signal>_]PROTOCOL`` were ignored without a word, and
    an operator pointing at a gRPC collector got no traces and no reason."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(name)
        if value:
            if value.strip().lower() != _PROTOCOL:
                log.warning(
                    "telemetry: %s=%r is not supported: vapora exports OTLP over %s only (a "
                    "collector's HTTP port, 4318 by default, path /v1/%s); %s go out so",
                    name,
                    value[:64],
                    _PROTOCOL,
                    signal.lower(),
                    "spans" if signal == "TRACES" else "metrics",
                )
            return  # the signal's own variable wins over the general one


def _missing_otlp(signal: str) -> None:
    log.warning(
        "telemetry: exporter otlp needs the optional extra: pip install 'vapora[otlp]'; "
        "%s are not exported",
        signal,
    )


def _otlp_spans(config: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter | None:
    try:
        from vapora.telemetry.otlp import OtlpSpanExporter
    except ImportError:
        _missing_otlp("spans")
        return None
    endpoint = _otlp_endpoint(config, env, "TRACES")
    if config.export_process:
        # Encoded and sent by a child process (vapora.telemetry.childexport).
        from vapora.telemetry.childexport import ChildSpanExporter
        from vapora.telemetry.export import setting

        timeout_s = setting({**os.environ, **env}, "OTEL_BSP_EXPORT_TIMEOUT") / 1000
        child: SpanExporter | None = _made(
            "span", lambda: ChildSpanExporter(endpoint, timeout_s=timeout_s)
        )
        return child
    # The SDK's exporter with a direct protobuf encoder (vapora.telemetry.otlp).
    exporter: SpanExporter | None = _made(
        "span", lambda: OtlpSpanExporter(endpoint=endpoint) if endpoint else OtlpSpanExporter()
    )
    return exporter


def _made(signal: str, build: Callable[[], Any]) -> Any:
    """The SDK's OTLP exporter ``build`` makes, or None (said in the log) when the SDK refuses
    its settings (an ``OTEL_PYTHON_EXPORTER_OTLP_*`` variable naming a provider that is not
    installed, say): a variable never stops a process from starting."""
    try:
        return build()
    except Exception as exc:
        log.warning(
            "telemetry: the OTLP %s exporter could not be made (%s: %s); nothing is exported "
            "over OTLP: check the OTEL_EXPORTER_OTLP_* and OTEL_PYTHON_EXPORTER_OTLP_* variables",
            signal,
            type(exc).__name__,
            str(exc)[:200],
        )
        return None


def _otlp_metrics(config: TelemetryConfig, env: Mapping[str, str]) -> MetricReader | None:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        _missing_otlp("metrics")
        return None
    endpoint = _otlp_endpoint(config, env, "METRICS")
    made = (lambda: OTLPMetricExporter(endpoint=endpoint)) if endpoint else OTLPMetricExporter
    exporter: Any = _made("metric", made)
    return None if exporter is None else PeriodicExportingMetricReader(exporter)


_EXEMPLAR_ENV = "OTEL_METRICS_EXEMPLAR_FILTER"
_EXEMPLAR_FILTERS: dict[str, ExemplarFilter] = {
    "always_on": AlwaysOnExemplarFilter(),
    "always_off": AlwaysOffExemplarFilter(),
    "trace_based": TraceBasedExemplarFilter(),
}


def _exemplars(
    env: Mapping[str, str], readers: Sequence[MetricReader], extra: Sequence[MetricReader]
) -> ExemplarFilter | None:
    """None (the SDK's choice: ``OTEL_METRICS_EXEMPLAR_FILTER``, else trace-based exemplars)
    unless the only reader is ``/metrics``: its text format cannot carry exemplars, and making
    them costs each histogram measurement a look at the current span and, in a sampled trace, an
    exemplar."""
    chosen = env.get(_EXEMPLAR_ENV, "").strip()
    if chosen and chosen.lower() not in _EXEMPLAR_FILTERS:
        # The SDK raises on it (ValueError from MeterProvider): vapora did not start.
        log.warning(
            "telemetry: %s=%r is none of %s; ignored",
            _EXEMPLAR_ENV,
            chosen[:100],
            ", ".join(sorted(_EXEMPLAR_FILTERS)),
        )
        chosen = ""
        invalid = True
    else:
        invalid = False
    if chosen:
        return _EXEMPLAR_FILTERS[chosen.lower()]
    if not extra and all(isinstance(reader, InMemoryMetricReader) for reader in readers):
        return AlwaysOffExemplarFilter()
    # As with no value: the SDK's default (None would have it read the variable, and raise).
    return TraceBasedExemplarFilter() if invalid else None


def _meter_provider(
    telemetry: Telemetry,
    config: TelemetryConfig,
    env: Mapping[str, str],
    resource: Resource,
    extra: Sequence[MetricReader],
) -> None:
    readers = list(extra)
    kinds = _exporters(config, env, _METRICS_EXPORTER, _METRIC_EXPORTERS)
    scrape = _scrape_address(config, env, "prometheus" in kinds)
    if scrape is not None:
        telemetry.prometheus_reader = InMemoryMetricReader()
        readers.append(telemetry.prometheus_reader)
    if "otlp" in kinds:
        reader = _otlp_metrics(config, env)
        if reader is not None:
            readers.append(reader)
    if "console" in kinds:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if not readers:
        return  # nothing would read them: record nothing
    telemetry.meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, exemplar_filter=_exemplars(env, readers, extra)
    )
    if telemetry.prometheus_reader is not None and scrape is not None:
        host, port, source = scrape
        try:
            endpoint = MetricsEndpoint(telemetry.prometheus_reader, host, port)
        except OSError as exc:  # a port in use, a host that is not this machine's
            telemetry.meter_provider.shutdown()
            raise ConfigError(
                f"{source}: cannot serve /metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        telemetry.metrics_endpoint = endpoint.start()


_FILE_SCRAPE = "telemetry.prometheus_host/prometheus_port"


def _scrape_address(
    config: TelemetryConfig, env: Mapping[str, str], asked: bool
) -> tuple[str, int, str] | None:
    """Where ``/metrics`` is served, and what said so: the file's ``prometheus_host`` /
    ``prometheus_port``; when ``OTEL_METRICS_EXPORTER`` names ``prometheus`` (``asked``), also
    without a port in the file, with ``OTEL_EXPORTER_PROMETHEUS_HOST`` / ``_PORT`` winning and
    9464 the default port. None: not served."""
    if not asked:
        if config.prometheus_port is None:
            return None
        return config.prometheus_host, config.prometheus_port, _FILE_SCRAPE
    host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or config.prometheus_host
    port = config.prometheus_port or _PROMETHEUS_PORT
    value = env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip()
    if value:
        if value.isdigit() and 0 < int(value) < 65536:
            port = int(value)
        else:
            log.warning(
                "telemetry: OTEL_EXPORTER_PROMETHEUS_PORT=%r is not a port; serving /metrics on %d",
                value,
                port,
            )
    return (
        host,
        port,
        f"{_METRICS_EXPORTER}=prometheus ({_FILE_SCRAPE}, OTEL_EXPORTER_PROMETHEUS_*)",
    )
