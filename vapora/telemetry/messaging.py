"""Messaging spans for the NATS hop (conventions: ``semconv.MESSAGING``), shared by the actors'
runtime (:mod:`actors.tracing`) and the Python client (:mod:`vapora.client`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from vapora.telemetry.semconv import MESSAGING
from vapora.telemetry.state import STATE

__all__ = ["attributes", "publish_span", "request_span", "unsampled"]

Attributes = dict[str, str | int | bool]


def attributes(subject: str, operation: str, group: str | None, msg_id: str | None) -> Attributes:
    """The messaging attributes of a ``send`` or ``process`` on ``subject``."""
    m = MESSAGING
    out: Attributes = {
        m.system: m.system_value,
        m.operation_type: operation,
        m.operation_name: m.publish if operation == m.send else operation,
        m.destination: subject,
    }
    if group:
        out[m.consumer_group] = group
    if msg_id:
        out[m.message_id] = msg_id
    return out


def unsampled(context: Context | None = None) -> bool:
    """Whether the current (or ``context``'s) trace was sampled out: its spans would not be
    recorded, so none are made; the unsampled context itself still travels downstream."""
    span_context = trace.get_current_span(context).get_span_context()
    return span_context.is_valid and not span_context.trace_flags.sampled


@contextmanager
def publish_span(subject: str, *, msg_id: str | None = None) -> Iterator[Span]:
    """A PRODUCER span ``publish <subject>`` (current while the block runs)."""
    if unsampled():
        yield trace.get_current_span()
        return
    with STATE.tracer.start_as_current_span(
        f"{MESSAGING.publish} {subject}",
        kind=SpanKind.PRODUCER,
        attributes=attributes(subject, MESSAGING.send, None, msg_id),
    ) as span:
        yield span


@contextmanager
def request_span(subject: str) -> Iterator[dict[str, str] | None]:
    """Around a request on ``subject``: with tracing on, a ``publish <subject>`` span (it spans
    the wait for the reply) and the headers that carry its context; with tracing off, no span
    and ``None`` (no headers to send)."""
    if not STATE.tracing:
        yield None
        return
    with publish_span(subject):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers
