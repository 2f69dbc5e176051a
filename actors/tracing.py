"""Trace context over NATS headers (W3C ``traceparent``/``tracestate``) and messaging spans.

Spans follow the OpenTelemetry messaging conventions (names in :mod:`vapora.telemetry.semconv`):

* ``publish <subject>`` (PRODUCER) when an actor sends: a request to another actor (the span
  covers the wait for the reply), or an event appended to the log (the span covers the wait for
  JetStream's acknowledgement). Its context is the message's *creation context*: it travels in
  the message's headers, and for events it is stored with the event in the stream.
* ``process <subject>`` (CONSUMER) when an actor handles a request, parented by the context the
  request carried, with ``messaging.system=nats``, the destination, the consumer group and the
  message id.
* Events read from the log: the live tail of a projection (the cost ledger) processes a batch's
  events of one trace in a span *parented* by the first one's creation context (and linked to
  the others'), so the ledger's work is part of the task's trace; a replay (start-up catch-up,
  audits) processes a batch in one span that *links* to the events' contexts and never parents
  under them, so a replay does not add spans to months-old traces.

Tracing is switched on and off in :mod:`vapora.telemetry.state` (``use``). While it is off,
actors skip span creation and header injection entirely: no tracer provider would record them,
and the hot path should not pay for work nobody sees. While it is on, spans are started with an
explicit parent and one attribute dict (``STATE.start_span``, :mod:`vapora.telemetry.spans`)
and headers are written and read by :mod:`vapora.telemetry.w3c`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind

from events.codec import event_tag
from vapora.telemetry import messaging, w3c
from vapora.telemetry.context import attach_span, current_span, detach, sampled_out
from vapora.telemetry.messaging import Current, failed
from vapora.telemetry.semconv import MESSAGING
from vapora.telemetry.semconv import VAPORA as _VAPORA
from vapora.telemetry.state import STATE, use_tracer_provider

__all__ = [
    "SYSTEM",
    "enabled",
    "extract",
    "inject",
    "link_to",
    "process_span",
    "processed",
    "recording",
    "publish_span",
    "request_span",
    "use",
]

SYSTEM = MESSAGING.system_value
#: Spans per replayed batch carry at most this many links (the SDK's default limit is 128).
MAX_LINKS = 128

_PROCESS = MESSAGING.process
_PUBLISH = MESSAGING.publish
_SEND = MESSAGING.send
_EVENT_TYPE = _VAPORA.event_type
_EVENT_SEQ = _VAPORA.event_seq
_EMPTY = otel_context.Context()  # a message's own context: nothing from the receiver's


def use(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or stop tracing with ``None``."""
    use_tracer_provider(provider)


def enabled() -> bool:
    return STATE.tracing


def recording() -> bool:
    """Whether spans are being recorded here: tracing is on and the current trace sampled (a
    new trace counts as sampled: whether it is, is decided when its first span starts)."""
    return STATE.tracing and not messaging.unsampled()


def __getattr__(name: str) -> Any:
    if name == "tracer":  # the current tracer (it changes with ``use``)
        return STATE.tracer
    raise AttributeError(f"module 'actors.tracing' has no attribute {name!r}")


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (adds to ``headers`` if given)."""
    carrier = headers if headers is not None else {}
    if STATE.tracing:
        w3c.inject(carrier, current_span())
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry (an empty context when none)."""
    return w3c.extract(headers)


def link_to(headers: Mapping[str, str] | None) -> list[Link]:
    """A span link to the context in ``headers``: replays link to old traces, never parent."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


_attributes = messaging.attributes
_shaped = messaging.shaped


class _Continued:
    """The unsampled context a message carried, current while the block runs (no span):
    ``span`` (its non-recording parent) set in ``base`` (the rest of the context it carried)."""

    __slots__ = ("_base", "_span", "_token")

    def __init__(self, span: Span, base: otel_context.Context) -> None:
        self._span = span
        self._base = base

    def __enter__(self) -> Span:
        self._token = attach_span(self._span, self._base)
        return self._span

    def __exit__(self, *exc: object) -> None:
        detach(self._token)


def process_span(
    subject: str,
    headers: Mapping[str, str] | bytes | None,
    *,
    group: str | None = None,
    msg_id: str | None = None,
) -> AbstractContextManager[Span]:
    """A CONSUMER span ``process <subject>`` continuing the trace the message carried.

    ``headers``: the message's headers, parsed, or the header block as received (bytes: only
    the trace context is read from it, cheaper than parsing every header)."""
    if isinstance(headers, bytes) or headers is None:
        parent = w3c.remote_parent(headers)
        if parent is not w3c.NEEDS_EXTRACT:  # a traceparent alone (or nothing): read directly
            if parent is not None and sampled_out(parent):
                return _Continued(NonRecordingSpan(parent), _EMPTY)
            name, attributes = _shaped(subject, _PROCESS, group, msg_id)
            span = STATE.start_span(name, SpanKind.CONSUMER, attributes, parent, ())
            return Current(span, _EMPTY, span)
        context = w3c.extract_raw(headers)
    else:
        context = w3c.extract(headers)
    parent = current_span(context).get_span_context()
    if sampled_out(parent):
        # No span; the unsampled context (and its baggage) stays current.
        return _Continued(current_span(context), context)
    name, attributes = _shaped(subject, _PROCESS, group, msg_id)
    span = STATE.start_span(name, SpanKind.CONSUMER, attributes, parent, ())
    return Current(span, context, span)


publish_span = messaging.publish_span
request_span = messaging.request_span


def start_publish(subject: str, *, msg_id: str, event_type: str) -> tuple[Span, dict[str, str]]:
    """A started PRODUCER span for one event append and its creation-context headers; the
    caller ends it when JetStream acknowledged (appends are pipelined, so not a ``with``)."""

    def build() -> tuple[str, messaging.Attributes]:
        name, attributes = _shaped(subject, _SEND, None, msg_id)
        attributes[_EVENT_TYPE] = event_type
        return name, attributes

    return _producer(build)


def start_publish_batch(
    appends: Sequence[tuple[str, str, str]], destination: str
) -> tuple[Span, dict[str, str]]:
    """One started PRODUCER span for several events appended together (``(subject, event id,
    event type)`` each) and the creation-context headers they all carry. Per the messaging
    conventions for a batch: ``messaging.batch.message_count``, the destination and its name
    in the span's name only when every event goes to one subject (else the stream's wildcard
    ``destination`` and the bare operation name); the events' ids and types as vapora's
    ``vapora.event.ids`` / ``vapora.event.types``."""

    def build() -> tuple[str, messaging.Attributes]:
        subject = appends[0][0]
        same = all(s == subject for s, _, _ in appends)
        attributes = _attributes(subject if same else destination, _SEND, None, None)
        attributes[MESSAGING.batch_count] = len(appends)
        attributes[_VAPORA.event_ids] = [msg_id for _, msg_id, _ in appends]
        attributes[_VAPORA.event_types] = [event_type for _, _, event_type in appends]
        return (f"{_PUBLISH} {subject}" if same else _PUBLISH), attributes

    return _producer(build)


def _producer(
    build: Callable[[], tuple[str, messaging.Attributes]],
) -> tuple[Span, dict[str, str]]:
    """A started PRODUCER span named and attributed by ``build`` under the current span, and
    the headers carrying its W3C trace context (stored with the events: never the caller's
    baggage); in a trace sampled out, no span (the current one, whose ending is a no-op) and
    the unsampled context's headers."""
    headers: dict[str, str] = {}
    current = current_span()
    parent = current.get_span_context()
    if sampled_out(parent):
        w3c.inject_trace_context(headers, current)
        return current, headers
    name, attributes = build()
    span = STATE.start_span(name, SpanKind.PRODUCER, attributes, parent, ())
    w3c.inject_trace_context(headers, span)  # stored with the event: no baggage
    return span, headers


def end_publish(span: Span, error: BaseException | None) -> None:
    if error is not None:
        failed(span, error)
    span.end()


@contextmanager
def processed(
    entries: Iterable[Any], *, group: str, replay: bool, destination: str
) -> Iterator[None]:
    """Spans for a projection applying stored events (see the module doc).

    Live (``replay=False``): one ``process`` CONSUMER span per trace the batch has events of,
    parented by the first of those events' creation context and linked to the others',
    spanning the batch's application (one transaction applies the batch).
    Replay: one ``process <destination>`` span (the stream's wildcard) linking to
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
    spans = _live_spans(batch, group, destination)
    try:
        yield
    except BaseException as exc:
        for span in spans:
            failed(span, exc)
        raise
    finally:
        for span in spans:
            span.end()


def _live_spans(batch: list[Any], group: str, destination: str) -> list[Span]:
    # One span per trace the batch holds events of: parented by the first event's creation
    # context, linked to the others' (the conventions' batch processing), so a task's events
    # processed together (its decision, its call, its spend) are one span in its trace. Each
    # event's context is read once; events appended together carry the same one, read once.
    traces: dict[int, list[tuple[Any, SpanContext]]] = {}
    read: dict[bytes, SpanContext | None] = {}
    plain = w3c.plain()
    for entry in batch:
        raw = getattr(entry, "raw_headers", None)  # a LogEntry: the header block as stored
        if plain and raw is not None and b"tracestate" not in raw and b"baggage" not in raw:
            value = w3c.raw_traceparent(raw)  # a traceparent alone: read directly
            if value is None:
                continue
            if value in read:
                context = read[value]
            else:
                context = read[value] = w3c.parse_traceparent(value)
            if context is w3c.NEEDS_EXTRACT:  # another version: through the propagator
                context = _parent_of(entry)
        else:  # more than a traceparent, or another propagator: through the propagator
            context = _parent_of(entry)
        if context is not None and context[3] & 1:  # valid (parsed so) and sampled
            traces.setdefault(context[0], []).append((entry, context))
    return [_live_span(entries, group, destination) for entries in traces.values()]


def _parent_of(entry: Any) -> SpanContext | None:
    raw = getattr(entry, "raw_headers", None)
    parent = w3c.remote_parent(raw) if raw is not None else w3c.NEEDS_EXTRACT
    if parent is w3c.NEEDS_EXTRACT:
        context = w3c.extract_raw(raw) if raw is not None else w3c.extract(entry.headers)
        parent = current_span(context).get_span_context()
    return parent if parent is not None and parent.is_valid else None


def _live_span(entries: list[tuple[Any, SpanContext]], group: str, destination: str) -> Span:
    """The ``process`` span of one trace's events in a live batch (their creation contexts
    given, sampled): parented by the first one's, linked to the others'."""
    first, parent = entries[0]
    if len(entries) == 1:
        name, attributes = _shaped(first.subject, _PROCESS, group, first.event.id)
        attributes[_EVENT_SEQ] = first.seq
        attributes[_EVENT_TYPE] = event_tag(first.event)
        return STATE.start_span(name, SpanKind.CONSUMER, attributes, parent, ())
    subject = first.subject
    if any(entry.subject != subject for entry, _ in entries):
        subject = destination
    attributes = _attributes(subject, _PROCESS, group, None)
    attributes[MESSAGING.batch_count] = len(entries)
    attributes[_VAPORA.event_ids] = [entry.event.id for entry, _ in entries]
    attributes[_VAPORA.event_types] = [event_tag(entry.event) for entry, _ in entries]
    links: list[Link] = []
    seen = {parent[1]}
    for _, context in entries[1:]:  # the other creation contexts (events appended apart)
        if context[1] not in seen and len(links) < MAX_LINKS:
            seen.add(context[1])
            links.append(Link(context))
    return STATE.start_span(f"{_PROCESS} {subject}", SpanKind.CONSUMER, attributes, parent, links)


def _replay_span(batch: list[Any], group: str, subject: str) -> AbstractContextManager[Any]:
    links: list[Link] = []
    for entry in batch:
        if len(links) >= MAX_LINKS:
            break
        links.extend(link_to(entry.headers))
    attributes = _attributes(subject, _PROCESS, group, None)
    attributes[MESSAGING.batch_count] = len(batch)
    attributes[_VAPORA.replay] = True
    # A new root: never under the caller's trace or the events' old traces.
    span = STATE.start_span(f"{_PROCESS} {subject}", SpanKind.CONSUMER, attributes, None, links)
    if not span.is_recording():
        return nullcontext()
    return Current(span, otel_context.Context(), None)
