"""Trace context over NATS headers (W3C ``traceparent``/``tracestate``) and messaging spans.

Spans follow the OpenTelemetry messaging conventions (names in :mod:`vapora.telemetry.semconv`):

* ``publish <subject>`` (PRODUCER) when an actor sends: a request to another actor (the span
  covers the wait for the reply), or an event appended to the log (the span covers the wait for
  JetStream's acknowledgement). Its context is the message's *creation context*: it travels in
  the message's headers, and for events it is stored with the event in the stream.
* ``process <subject>`` (CONSUMER) when an actor handles a request, parented by the context the
  request carried, with ``messaging.system=nats``, the destination, the consumer group and the
  message id.
* Events read from the log: the live tail of a projection (the cost ledger) processes each event
  in a span *parented* by the event's creation context, so the ledger's work is part of the
  task's trace; a replay (start-up catch-up, audits) processes a batch in one span that *links*
  to the events' contexts and never parents under them, so a replay does not add spans to
  months-old traces.

Tracing is switched on and off in :mod:`vapora.telemetry.state` (``use``). While it is off,
actors skip span creation and header injection entirely: no tracer provider would record them,
and the hot path should not pay for work nobody sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from events.codec import event_tag
from vapora.telemetry import messaging
from vapora.telemetry.semconv import MESSAGING, VAPORA
from vapora.telemetry.state import STATE, use_tracer_provider

__all__ = [
    "SYSTEM",
    "enabled",
    "extract",
    "inject",
    "link_to",
    "process_span",
    "processed",
    "publish_span",
    "request_span",
    "use",
]

SYSTEM = MESSAGING.system_value
#: Spans per replayed batch carry at most this many links (the SDK's default limit is 128).
MAX_LINKS = 128


def use(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or stop tracing with ``None``."""
    use_tracer_provider(provider)


def enabled() -> bool:
    return STATE.tracing


def __getattr__(name: str) -> Any:
    if name == "tracer":  # the current tracer (it changes with ``use``)
        return STATE.tracer
    raise AttributeError(f"module 'actors.tracing' has no attribute {name!r}")


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (adds to ``headers`` if given)."""
    carrier = headers if headers is not None else {}
    if STATE.tracing:
        propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry (an empty context when none)."""
    return propagate.extract(headers or {})


def link_to(headers: Mapping[str, str] | None) -> list[Link]:
    """A span link to the context in ``headers``: replays link to old traces, never parent."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


_attributes = messaging.attributes


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
    if messaging.unsampled(parent):  # no span; the unsampled context stays current
        token = otel_context.attach(parent)
        try:
            yield trace.get_current_span(parent)
        finally:
            otel_context.detach(token)
        return
    with STATE.tracer.start_as_current_span(
        f"{MESSAGING.process} {subject}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=_attributes(subject, MESSAGING.process, group, msg_id),
    ) as span:
        yield span


publish_span = messaging.publish_span
request_span = messaging.request_span


def start_publish(subject: str, *, msg_id: str, event_type: str) -> tuple[Span, dict[str, str]]:
    """A started PRODUCER span for one event append and its creation-context headers; the
    caller ends it when JetStream acknowledged (appends are pipelined, so not a ``with``)."""
    headers: dict[str, str] = {}
    if messaging.unsampled():
        propagate.inject(headers)
        return trace.get_current_span(), headers  # ending it is a no-op
    attributes = _attributes(subject, MESSAGING.send, None, msg_id)
    attributes[VAPORA.event_type] = event_type
    span = STATE.tracer.start_span(
        f"{MESSAGING.publish} {subject}", kind=SpanKind.PRODUCER, attributes=attributes
    )
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span, headers


def end_publish(span: Span, error: BaseException | None) -> None:
    if error is not None:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()


@contextmanager
def processed(
    entries: Iterable[Any], *, group: str, replay: bool, destination: str
) -> Iterator[None]:
    """Spans for a projection applying stored events (see the module doc).

    Live (``replay=False``): one ``process <subject>`` CONSUMER span per event that carries a
    trace context, parented by it, spanning the batch's application (one transaction applies
    the batch). Replay: one ``process <destination>`` span (the stream's wildcard) linking to
    up to :data:`MAX_LINKS` of the batch's events. ``entries`` are ``LogEntry`` s.
    """
    if not STATE.tracing:
        yield
        return
    batch = list(entries)
    if replay:
        with _replay_span(batch, group, destination):
            yield
        return
    spans = [
        _live_span(entry, headers, group)
        for entry in batch
        if "traceparent" in (headers := entry.headers) and not messaging.unsampled(extract(headers))
    ]
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for span in spans:
            span.end()


def _live_span(entry: Any, headers: Mapping[str, str], group: str) -> Span:
    attributes = _attributes(entry.subject, MESSAGING.process, group, entry.event.id)
    attributes[VAPORA.event_seq] = entry.seq
    attributes[VAPORA.event_type] = event_tag(entry.event)
    return STATE.tracer.start_span(
        f"{MESSAGING.process} {entry.subject}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )


@contextmanager
def _replay_span(batch: list[Any], group: str, subject: str) -> Iterator[None]:
    links: list[Link] = []
    for entry in batch:
        if len(links) >= MAX_LINKS:
            break
        links.extend(link_to(entry.headers))
    attributes = _attributes(subject, MESSAGING.process, group, None)
    attributes[MESSAGING.batch_count] = len(batch)
    attributes[VAPORA.replay] = True
    with STATE.tracer.start_as_current_span(
        f"{MESSAGING.process} {subject}",
        context=otel_context.Context(),  # a new root: never under the caller's or old traces
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    ):
        yield
