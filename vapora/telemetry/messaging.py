"""Messaging spans for the NATS hop (conventions: ``semconv.MESSAGING``), shared by the actors'
runtime (:mod:`actors.tracing`) and the Python client (:mod:`vapora.client`).

Spans are started with an explicit parent and their attributes in one dict
(``STATE.start_span``), made current with one context attach, and ended directly: no
``start_as_current_span`` generator, no ``Status`` or exception events on the way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import Generic, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from vapora.errors import VaporaError
from vapora.telemetry import w3c
from vapora.telemetry.context import attach_span, current_span, detach, sampled_out
from vapora.telemetry.semconv import MESSAGING
from vapora.telemetry.state import STATE

__all__ = [
    "Current",
    "attributes",
    "current_failed",
    "end_request",
    "error_type",
    "failed",
    "publish_span",
    "request_span",
    "start_request",
    "unsampled",
]

Attributes = dict[str, str | int | bool | list[str]]
T = TypeVar("T")

_SYSTEM = (MESSAGING.system, MESSAGING.system_value)


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


_SHAPES: dict[tuple[str, str, str | None], tuple[str, Attributes]] = {}


def shaped(
    subject: str, operation: str, group: str | None, msg_id: str | None
) -> tuple[str, Attributes]:
    """The span name (``<operation name> <subject>``) and a fresh copy of the messaging
    attributes of an operation on ``subject`` (plus ``msg_id``): both made once per subject,
    operation and group (vapora's subjects are few), then the attributes copied in one call."""
    key = (subject, operation, group)
    shape = _SHAPES.get(key)
    if shape is None:
        operation_name = MESSAGING.publish if operation == MESSAGING.send else operation
        shape = (f"{operation_name} {subject}", attributes(subject, operation, group, None))
        if len(_SHAPES) < 4096:
            _SHAPES[key] = shape
    name, base = shape
    out = base.copy()
    if msg_id:
        out[MESSAGING.message_id] = msg_id
    return name, out


def unsampled(context: Context | None = None) -> bool:
    """Whether the current (or ``context``'s) trace was sampled out: its spans would not be
    recorded, so none are made; the unsampled context itself still travels downstream."""
    return sampled_out(current_span(context).get_span_context())


def error_type(error: BaseException) -> str:
    """The low-cardinality ``error.type`` of ``error``: a vapora error's contract code (what
    crosses NATS: ``budget_exceeded``, ``timeout``, ``internal`` ...), else its class."""
    if isinstance(error, VaporaError):
        return error.code
    return type(error).__qualname__


def failed(span: Span, error: BaseException | str) -> None:
    """Record that ``error`` ended ``span``'s work: ``error.type`` (:func:`error_type`, or the
    string given) and the ERROR status. No exception event: its message or stack could hold a
    prompt or a key."""
    kind = error if isinstance(error, str) else error_type(error)
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, kind))


def current_failed(kind: str) -> None:
    """Record ``error.type`` ``kind`` and the ERROR status on the current span, the one handling
    a request whose answer is an error (nothing when tracing is off or it is not recording)."""
    if STATE.tracing:
        span = current_span()
        if span.is_recording():
            failed(span, kind)


class Current(Generic[T]):
    """While the block runs, ``span`` is current in ``context``; afterwards it ends (with the
    error recorded if one escapes). ``__enter__`` returns ``value``."""

    __slots__ = ("_context", "_span", "_token", "_value")

    def __init__(self, span: Span, context: Context | None, value: T) -> None:
        self._span = span
        self._context = context
        self._value = value

    def __enter__(self) -> T:
        self._token = attach_span(self._span, self._context)
        return self._value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        detach(self._token)
        if exc is not None and not isinstance(exc, GeneratorExit):
            failed(self._span, exc)
        self._span.end()


def _publish(subject: str, msg_id: str | None) -> Span | None:
    """A started ``publish <subject>`` under the current span; None when it is sampled out."""
    parent = current_span().get_span_context()
    if sampled_out(parent):
        return None
    name, attributes_ = shaped(subject, MESSAGING.send, None, msg_id)
    return STATE.start_span(name, SpanKind.PRODUCER, attributes_, parent, ())


def publish_span(subject: str, *, msg_id: str | None = None) -> AbstractContextManager[Span]:
    """A PRODUCER span ``publish <subject>`` (current while the block runs); none with vapora's
    tracing off (a host's own SDK would record a stray root span of it)."""
    if not STATE.tracing:
        return nullcontext(current_span())
    span = _publish(subject, msg_id)
    if span is None:
        return nullcontext(current_span())
    return Current(span, None, span)


_NO_HEADERS: AbstractContextManager[None] = nullcontext(None)  # reusable: it holds no state


def caller_headers() -> dict[str, str] | None:
    """With vapora's tracing off: the headers carrying the current span's context when there is
    a valid one (a service tracing with its own OpenTelemetry SDK calls vapora: the call stays
    in its trace), else None. No current span costs a context read and a comparison."""
    span = current_span()
    if span is INVALID_SPAN or not span.get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    w3c.inject(headers, span)
    return headers or None


def request_span(subject: str) -> AbstractContextManager[dict[str, str] | None]:
    """Around a request on ``subject``: with tracing on, a ``publish <subject>`` span (it spans
    the wait for the reply, and records the error that ends the block) and the headers that
    carry its context; with tracing off, no span of vapora's and the headers of the caller's
    own current span (:func:`caller_headers`), ``None`` when there is none."""
    if not STATE.tracing:
        if current_span() is INVALID_SPAN:  # the hot path with telemetry off: one context read
            return _NO_HEADERS
        return nullcontext(caller_headers())
    headers: dict[str, str] = {}
    span = _publish(subject, None)
    if span is None:  # sampled out: the unsampled context travels on
        w3c.inject(headers, current_span())
        return nullcontext(headers)
    w3c.inject(headers, span)
    return Current(span, None, headers)


@contextmanager
def publish_under(
    parent: Span | None, subject: str, request_headers: dict[str, str] | None
) -> Iterator[dict[str, str] | None]:
    """Around a message sent on behalf of a request whose span is not current (a stream's, from
    :func:`start_request`): a ``publish <subject>`` span under ``parent``, and the headers that
    carry its context; without a span of vapora's (tracing off, or the trace sampled out), the
    request's own trace headers, ``request_headers`` (the context current now may be another
    trace's: a stream closed under another span, or by the collector)."""
    if parent is None:
        yield request_headers
        return
    token = attach_span(parent, None)
    try:
        with request_span(subject) as headers:
            yield headers
    finally:
        detach(token)


def start_request(subject: str) -> tuple[Span | None, dict[str, str] | None]:
    """:func:`request_span` for a request whose replies outlive a block (a stream): the started
    span, not made current (None: none was made), and the headers; end it with
    :func:`end_request` when the last reply came or the request failed."""
    if not STATE.tracing:
        return None, caller_headers()
    headers: dict[str, str] = {}
    span = _publish(subject, None)
    w3c.inject(headers, span if span is not None else current_span())
    return span, headers


def end_request(span: Span | None, error: BaseException | None = None) -> None:
    """End a span from :func:`start_request` (nothing when None), recording ``error`` if given."""
    if span is None:
        return
    if error is not None:
        failed(span, error)
    span.end()
