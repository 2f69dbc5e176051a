"""W3C trace context in NATS headers, formatted and parsed directly when that is all there is.

OpenTelemetry's global propagator (``tracecontext,baggage`` unless ``OTEL_PROPAGATORS`` says
otherwise) goes through a composite, a getter, a setter and, to extract, a regular expression
search, the baggage parser and two context copies: about 9 µs per extraction and 3 µs per
injection, and vapora does each several times per task. When the global propagator is the
default one and there is no baggage to carry, the result is exactly a ``traceparent`` (plus
``tracestate`` when the span context has one), so these functions write and read that
themselves. Any other propagator, or baggage in the context or in the headers, goes through
the global propagator unchanged; when it writes no ``traceparent`` (``OTEL_PROPAGATORS=none``,
or a set without ``tracecontext``), W3C trace context is added (and read when the propagators
read no parent): a task is one trace whatever the variable says.

``opentelemetry.propagate`` is imported on first use, not with this module: importing it loads
the propagators ``OTEL_PROPAGATORS`` names and raises when one is not installed, which would
stop every command (telemetry on or off) at ``import vapora.client``. When it cannot be
imported, the log says so once, naming the variable and its value, and the named propagators
that do load are used (W3C trace context and baggage when none does).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from vapora.telemetry.context import current_context

__all__ = [
    "NEEDS_EXTRACT",
    "extract",
    "extract_raw",
    "inject",
    "inject_trace_context",
    "parse_traceparent",
    "plain",
    "raw_traceparent",
    "remote_parent",
    "traceparent",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_W3C = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_checked: tuple[TextMapPropagator | None, bool] = (None, False)
# Where the API keeps baggage in a context (a private name: without it, baggage.get_all).
_BAGGAGE_KEY: str | None = getattr(baggage, "_BAGGAGE_KEY", None)
_RAW_TRACEPARENT = b"\r\ntraceparent:"
_PROPAGATORS_ENV = "OTEL_PROPAGATORS"
_TRACE_CONTEXT = TraceContextTextMapPropagator()

log = logging.getLogger("vapora.telemetry")


def _resolve_textmap() -> TextMapPropagator:
    """The global propagator: ``opentelemetry.propagate``'s, imported now (see the module doc),
    or, when importing it fails, the loadable propagators of ``OTEL_PROPAGATORS``."""
    global _global_textmap
    try:
        from opentelemetry import propagate
    except Exception as exc:  # a name not installed (ValueError), or its loading failed
        fallback = _loadable_propagators(os.environ.get(_PROPAGATORS_ENV, ""), exc)
        _global_textmap = lambda: fallback  # noqa: E731 - a getter like the API's
    else:
        _global_textmap = propagate.get_global_textmap
    return _global_textmap()


#: ``opentelemetry.propagate.get_global_textmap`` once resolved (:func:`_resolve_textmap`).
_global_textmap: Callable[[], TextMapPropagator] = _resolve_textmap


def _loadable_propagators(configured: str, error: Exception) -> TextMapPropagator:
    """The propagators named in ``configured`` that load (W3C trace context and baggage when
    none does), the others named in one warning."""
    from opentelemetry.util._importlib_metadata import entry_points

    loaded: list[TextMapPropagator] = []
    missing: list[str] = []
    for name in (n.strip() for n in configured.split(",")):
        try:
            found = entry_points(group="opentelemetry_propagator", name=name)
            loaded.append(next(iter(found)).load()())
        except Exception:  # not installed (StopIteration) or failing to load
            missing.append(name)
    if not loaded:
        loaded = [TraceContextTextMapPropagator(), W3CBaggagePropagator()]
    used = ",".join(type(p).__name__ for p in loaded)
    log.warning(
        "telemetry: %s=%r names propagators that cannot be loaded (%s: %s); trace context "
        "is propagated with %s instead",
        _PROPAGATORS_ENV,
        configured,
        ", ".join(missing) or "?",
        type(error).__name__,
        used,
    )
    return CompositePropagator(loaded)


def plain() -> bool:
    """Whether the global propagator is W3C trace context (with or without baggage) only: then
    a ``traceparent`` (and ``tracestate``) is all the trace context a message carries."""
    return _plain_w3c()


def _plain_w3c() -> bool:
    """Whether the global propagator is W3C trace context (with or without baggage) only."""
    global _checked
    textmap = _global_textmap()
    if textmap is not _checked[0]:  # checked once per propagator set
        parts = textmap._propagators if isinstance(textmap, CompositePropagator) else [textmap]
        # No propagator at all (``OTEL_PROPAGATORS=none``): vapora's hops carry W3C trace
        # context anyway (see inject), and nothing else.
        plain = all(type(p) in _W3C for p in parts) and (
            not parts or any(type(p) is TraceContextTextMapPropagator for p in parts)
        )
        _checked = (textmap, plain)
    return _checked[1]


_FLAGS = [f"{flags:02x}" for flags in range(256)]
_TRACE_FLAGS = [TraceFlags(flags) for flags in range(256)]
_new_tuple = tuple.__new__
_RAW_VERSION_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: :func:`remote_parent`'s answer when the header block needs the full extraction.
NEEDS_EXTRACT: Any = object()


def traceparent(span_context: SpanContext) -> str:
    """The ``traceparent`` header of ``span_context`` (version 00)."""
    # int.to_bytes().hex() is about twice as fast as f"{:032x}"; a SpanContext is a tuple
    # (trace id, span id, is remote, flags, state, is valid) whose properties read its items.
    trace_id = span_context[0].to_bytes(16).hex()
    return f"00-{trace_id}-{span_context[1].to_bytes(8).hex()}-{_FLAGS[span_context[3]]}"


def _has_baggage(context: Context | None) -> bool:
    if _BAGGAGE_KEY is None:
        return bool(baggage.get_all(context))
    return bool((context if context is not None else current_context()).get(_BAGGAGE_KEY))


def inject(headers: MutableMapping[str, str], span: Span, context: Context | None = None) -> None:
    """Add ``span``'s context to ``headers``; ``context`` is the one ``span`` lives in (the
    current one when None), whose baggage travels too."""
    if _plain_w3c() and not _has_baggage(context):
        inject_trace_context(headers, span)
        return
    in_context = trace.set_span_in_context(span, context)
    _global_textmap().inject(headers, context=in_context)
    if TRACEPARENT not in headers:
        # vapora's own hops always carry W3C trace context: with ``OTEL_PROPAGATORS=none`` (or
        # a set without ``tracecontext``) every actor's spans started a trace of their own.
        _TRACE_CONTEXT.inject(headers, context=in_context)


def inject_trace_context(headers: MutableMapping[str, str], span: Span) -> None:
    """Add ``span``'s W3C trace context alone (``traceparent``, and ``tracestate`` when it has
    one) to ``headers``, whatever the propagators: what an event stored in the log carries.
    Baggage is the caller's (a user or tenant id, up to 8 KB), not the event's: it was stored
    with every event of the task, in a log that is never deleted."""
    # A span injected before keeps its headers (an unsampled message's context goes out on
    # every message its handler sends: formatted once).
    made = getattr(span, "_vapora_headers", None)
    if made is None:
        made = _headers_of(span.get_span_context())
        try:  # noqa: SIM105 - contextlib.suppress makes an object per span
            span._vapora_headers = made  # type: ignore[attr-defined]
        except AttributeError:  # a class with slots: formatted each time
            pass
    if made:
        headers[TRACEPARENT] = made[0]
        if made[1] is not None:
            headers[TRACESTATE] = made[1]


def _headers_of(span_context: SpanContext) -> tuple[str, str | None] | tuple[()]:
    """``(traceparent, tracestate or None)`` of a span context; ``()`` when it is invalid."""
    if not span_context[5]:  # is_valid
        return ()
    state = span_context[4]
    if state is DEFAULT_TRACE_STATE or not state:  # TraceState's len() is Python code
        return traceparent(span_context), None
    return traceparent(span_context), state.to_header()


#: The W3C limits (trace context: a ``tracestate`` of at most 32 members, 512 characters
#: to propagate; baggage: 8,192 bytes): a longer header is not read. The propagators log a
#: value they refuse whole, so a caller's 500 KB header made a 500 KB log line per request.
_MAX_TRACESTATE = 512
_MAX_BAGGAGE = 8192


def _bounded(headers: Mapping[str, str]) -> Mapping[str, str]:
    state, bag = headers.get(TRACESTATE), headers.get("baggage")
    if (state is None or len(state) <= _MAX_TRACESTATE) and (
        bag is None or len(bag) <= _MAX_BAGGAGE
    ):
        return headers
    kept = dict(headers)
    if state is not None and len(state) > _MAX_TRACESTATE:
        del kept[TRACESTATE]
    if bag is not None and len(bag) > _MAX_BAGGAGE:
        del kept["baggage"]
    global _warned_at
    now = time.monotonic()
    if now - _warned_at >= 60:  # at most a line a minute, whoever sends them
        _warned_at = now
        log.warning(
            "telemetry: a trace context header past the W3C limits was not read (tracestate "
            "%d characters, baggage %d)",
            len(state or ""),
            len(bag or ""),
        )
    return kept


_warned_at = -60.0


def extract(headers: Mapping[str, str] | None) -> Context:
    """The context ``headers`` carry: a remote parent span (non-recording), or an empty context."""
    if not headers:
        return Context()
    headers = _bounded(headers)
    value = headers.get(TRACEPARENT)
    match = _VERSION_00.fullmatch(value) if value is not None else None
    if match is None or "baggage" in headers or not _plain_w3c():
        if value is None and "baggage" not in headers and _plain_w3c():
            return Context()  # nothing to extract
        context = _global_textmap().extract(headers)  # other versions, padding, baggage, ...
        if value is not None and not trace.get_current_span(context).get_span_context().is_valid:
            # The configured propagators read no parent (none of them W3C trace context):
            # the traceparent vapora's own hops always carry (see inject) still joins the trace.
            context = _TRACE_CONTEXT.extract(headers, context=context)
        return context
    trace_hex, span_hex, flags = match.groups()
    if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return Context()
    state = headers.get(TRACESTATE)
    span_context = SpanContext(
        int(trace_hex, 16),
        int(span_hex, 16),
        True,
        TraceFlags(int(flags, 16)),
        TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def extract_raw(raw: bytes | None) -> Context:
    """:func:`extract` from a NATS header block as received (``NATS/1.0\\r\\nName: value…``),
    reading only ``traceparent`` when that is all the context there is (the whole block is
    parsed only when it also has ``tracestate`` or ``baggage``, or another propagator is set)."""
    if not raw:
        return Context()
    if b"tracestate" in raw or b"baggage" in raw or not _plain_w3c():
        return extract(_parse_headers(raw))
    value = raw_traceparent(raw)
    if value is None:
        return Context()
    return extract({TRACEPARENT: value.decode("ascii", "replace")})


def remote_parent(raw: bytes | None) -> SpanContext | None:
    """The remote parent a NATS header block as received carries (None: no valid one), read
    from its ``traceparent`` alone; :data:`NEEDS_EXTRACT` when there is more to the context
    (``tracestate``, ``baggage``, another propagator): then use :func:`extract_raw`."""
    if not raw:
        return None
    if b"tracestate" in raw or b"baggage" in raw or not _plain_w3c():
        return NEEDS_EXTRACT  # type: ignore[no-any-return]
    value = raw_traceparent(raw)
    if value is None:
        return None
    return parse_traceparent(value)


def parse_traceparent(value: bytes) -> SpanContext | None:
    """The remote span context of a ``traceparent`` value as received (None: not a valid one);
    :data:`NEEDS_EXTRACT` for a version other than 00 (the propagator decides)."""
    match = _RAW_VERSION_00.fullmatch(value)
    if match is None:
        return NEEDS_EXTRACT  # type: ignore[no-any-return]  # other versions: the propagator
    trace_hex, span_hex, flags = match.groups()
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    # SpanContext(trace_id, span_id, True, flags), valid by the checks above.
    context: SpanContext = _new_tuple(
        SpanContext,
        (trace_id, span_id, True, _TRACE_FLAGS[int(flags, 16)], DEFAULT_TRACE_STATE, True),
    )
    return context


def raw_traceparent(raw: bytes | None) -> bytes | None:
    """The ``traceparent`` value in a NATS header block as received, unparsed (None: none)."""
    if not raw:
        return None
    start = raw.find(_RAW_TRACEPARENT)
    if start < 0:
        return None
    start += len(_RAW_TRACEPARENT)
    end = raw.find(b"\r\n", start)
    return raw[start : end if end >= 0 else len(raw)].strip()


def _parse_headers(raw: bytes) -> dict[str, str]:
    from nats.aio.client import Client  # the same parser the actors use for their headers

    parsed: dict[str, str] = Client._parse_header_lines(raw[raw.find(b"\r\n") :])
    return parsed
