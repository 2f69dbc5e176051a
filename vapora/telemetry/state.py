"""What telemetry is switched on in this process: the tracer, the metric instruments, the names.

Instrumented code asks :data:`STATE` before doing any telemetry work, so that with telemetry
off the hot path pays one attribute read (``STATE.tracing`` / ``STATE.metrics``) and nothing
else: no span objects, no header injection, no attribute dictionaries.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Tracer,
    TracerProvider,
)

from vapora.telemetry.instruments import Instruments
from vapora.telemetry.semconv import V1_41, GenAINames

__all__ = [
    "STATE",
    "SpanStart",
    "TelemetryState",
    "sdk_start_span",
    "use_meter_provider",
    "use_tracer_provider",
]

SCOPE = "vapora"

#: ``start_span(name, kind, attributes, parent, links)``: a started span under ``parent`` (a
#: remote or local span context; None or invalid: a new trace), not made current.
SpanStart = Callable[[str, SpanKind, dict[str, Any], SpanContext | None, Sequence[Link]], Span]


def sdk_start_span(
    name: str,
    kind: SpanKind,
    attributes: dict[str, Any],
    parent: SpanContext | None,
    links: Sequence[Link] = (),
) -> Span:
    """:data:`SpanStart` through the tracer's own ``start_span`` (any tracer)."""
    context = Context()
    if parent is not None and parent.is_valid:
        context = trace.set_span_in_context(NonRecordingSpan(parent), context)
    return STATE.tracer.start_span(name, context, kind, attributes, links, record_exception=False)


@dataclass
class TelemetryState:
    """The switches; mutated only by :func:`use_tracer_provider` / :func:`use_meter_provider`."""

    tracer: Tracer = field(default_factory=lambda: trace.get_tracer(SCOPE))
    tracing: bool = False
    #: How spans are started: vapora's lean path over the SDK (:mod:`vapora.telemetry.spans`)
    #: when the tracer is the SDK's, else the tracer's own ``start_span``.
    start_span: SpanStart = sdk_start_span
    metrics: Instruments | None = None
    capture_content: bool = False
    names: GenAINames = V1_41


STATE = TelemetryState()


_tracers: weakref.WeakKeyDictionary[TracerProvider, tuple[Tracer, SpanStart]] = (
    weakref.WeakKeyDictionary()
)


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or stop tracing with ``None``."""
    if provider is None:
        STATE.tracing = False
        STATE.tracer = trace.get_tracer_provider().get_tracer(SCOPE)
        STATE.start_span = sdk_start_span
        return
    # The tracer and its span starter are made once per provider (benchmarks switch often).
    made = _tracers.get(provider)
    if made is None:
        from vapora.telemetry.spans import starter_for  # the SDK, only once tracing is on

        tracer = provider.get_tracer(SCOPE)
        starter = starter_for(tracer)
        made = _tracers[provider] = (tracer, starter.start if starter else sdk_start_span)
    STATE.tracer, STATE.start_span = made
    STATE.tracing = True


_instruments: weakref.WeakKeyDictionary[MeterProvider, Instruments] = weakref.WeakKeyDictionary()


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record metrics through ``provider``, or stop recording with ``None``."""
    if provider is None:
        STATE.metrics = None
        return
    # Instruments are made once per provider (and names), then reused when switched back to.
    instruments = _instruments.get(provider)
    if instruments is None or instruments.names is not STATE.names:
        instruments = _instruments[provider] = Instruments(provider.get_meter(SCOPE), STATE.names)
    STATE.metrics = instruments


def use_options(*, capture_content: bool, names: GenAINames) -> None:
    """Whether prompt and completion text go on spans (opt-in), and which names to emit."""
    STATE.capture_content = capture_content
    STATE.names = names
