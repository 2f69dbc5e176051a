"""Trace context over NATS headers (W3C ``traceparent``/``tracestate``) and messaging spans.

Spans follow the OpenTelemetry messaging conventions: ``publish <subject>`` (PRODUCER) when an actor
sends, ``process <subject>`` (CONSUMER) when it handles a message, with ``messaging.system=nats``,
the destination, the consumer group and the message id. When no tracer provider is installed the
OpenTelemetry API hands out non-recording spans, so the cost left on the hot path is a header
lookup and a context switch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

__all__ = [
    "enabled",
    "use",
    "extract",
    "inject",
    "link_to",
    "process_span",
    "publish_span",
    "tracer",
]

tracer = trace.get_tracer("vapora.actors")
_enabled = False


def use(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or stop tracing with ``None``.

    While tracing is off, actors skip span creation and header injection entirely: no tracer
    provider would record them, and the hot path should not pay for work nobody sees.
    """
    global tracer, _enabled
    tracer = (provider or trace.get_tracer_provider()).get_tracer("vapora.actors")
    _enabled = provider is not None


def enabled() -> bool:
    return _enabled


SYSTEM = "nats"


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (adds to ``headers`` if given)."""
    carrier = headers if headers is not None else {}
    if _enabled:
        propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry (an empty context when none)."""
    return propagate.extract(headers or {})


def link_to(headers: Mapping[str, str] | None) -> list[Link]:
    """A span link to the context in ``headers``: replays link to old traces, never parent."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


def _attributes(
    subject: str, operation: str, group: str | None, msg_id: str | None
) -> dict[str, str]:
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": "publish" if operation == "send" else operation,
        "messaging.destination.name": subject,
    }
    if group:
        attributes["messaging.consumer.group.name"] = group
    if msg_id:
        attributes["messaging.message.id"] = msg_id
    return attributes


@contextmanager
def process_span(
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    group: str | None = None,
    msg_id: str | None = None,
) -> Iterator[Span]:
    """A CONSUMER span ``process <subject>`` continuing the trace the message carried."""
    parent = extract(headers)
    with tracer.start_as_current_span(
        f"process {subject}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=_attributes(subject, "process", group, msg_id),
    ) as span:
        yield span


@contextmanager
def publish_span(subject: str, *, msg_id: str | None = None) -> Iterator[Span]:
    """A PRODUCER span ``publish <subject>``; inject its context into the outgoing headers."""
    with tracer.start_as_current_span(
        f"publish {subject}",
        kind=SpanKind.PRODUCER,
        attributes=_attributes(subject, "send", None, msg_id),
    ) as span:
        yield span
