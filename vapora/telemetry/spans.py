"""vapora's own spans: started with an explicit parent and one attribute dict, ended directly.

The OpenTelemetry SDK's ``Tracer.start_span`` spends about 18 µs on each span: a lock, the
``BoundedAttributes`` copy that checks every value, a sampling result object, the processor's
``on_start`` and, at ``end``, a second object (the ``ReadableSpan`` handed to the processors).
A task makes about 15 spans, so on the two cores that also run the actors that was most of
what tracing cost. vapora's spans have a known, small set of attributes of valid types, so
:class:`VaporaSpan` skips that work. It is an SDK :class:`~opentelemetry.sdk.trace.ReadableSpan`
(so every SDK processor and exporter takes it: batch, OTLP, console, in-memory, JSON lines)
and an API :class:`~opentelemetry.trace.Span` (so it can be the current span, and
``trace.get_current_span().set_attribute(...)`` works on it). The SDK's pieces are still the
ones used: its sampler decides, its id generator makes the ids, its span processors receive
``on_start`` / ``on_end``, with the provider's resource and the tracer's scope.

:func:`starter_for` returns ``None`` (and the callers use the SDK's ``Tracer.start_span``)
when the tracer is not the SDK's, or when its settings ask for what :class:`VaporaSpan` does
not do: span limits below the SDK's defaults, the SDK's own span metrics, a disabled tracer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util import types

__all__ = ["SpanStarter", "VaporaSpan", "starter_for"]

log = logging.getLogger("vapora.telemetry")

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_BIT = TraceFlags.SAMPLED
_RANDOM_BIT = TraceFlags.RANDOM_TRACE_ID
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSAMPLED_RANDOM = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
_TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
_NO_PARENT = Context()
_DEFAULTS = SpanLimits()
# Processors whose on_start does nothing: not called (the SDK's own, vapora's batcher).
_QUIET_STARTS: set[Any] = {
    SpanProcessor.on_start,
    BatchSpanProcessor.on_start,
    SimpleSpanProcessor.on_start,
}
_new_tuple = tuple.__new__


def _local_context(trace_id: int, span_id: int, flags: TraceFlags, state: Any) -> SpanContext:
    """``SpanContext(trace_id, span_id, False, flags, state)`` for ids known to be valid (made
    here or read from a valid parent), without the constructor's checks."""
    return _new_tuple(SpanContext, (trace_id, span_id, False, flags, state, True))


class VaporaSpan(trace_api.Span, ReadableSpan):
    """A recording span (see the module doc); read by processors and exporters once ended."""

    #: Its trace-context headers once injected (``vapora.telemetry.w3c.inject``).
    _vapora_headers: tuple[str, str | None] | tuple[()] | None = None
    # Fields every span starts with the same value of: class defaults, replaced per span only
    # when they change (one instance attribute set fewer each, per span).
    _events: list[Event] | tuple[()] = ()
    _instrumentation_info = None
    _status = _UNSET
    _end_time: int | None = None

    def __init__(
        self,
        starter: SpanStarter,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
    ) -> None:
        # ReadableSpan's fields, set directly (its __init__ would build a default Resource).
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = self._values = attributes  # _values: the same dict, typed mutable
        self._links = links
        self._resource = starter.resource
        self._instrumentation_scope = starter.scope
        self._start_time = time_ns()
        self._on_end = starter.on_end

    # --- the API span -------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is None and value is not None:
            self._values[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is None:
            if None in attributes.values():
                self._values.update((k, v) for k, v in attributes.items() if v is not None)
            else:  # the usual case: one C-level update
                self._values.update(attributes)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def fail(self, error_type: str, description: str | None = None) -> None:
        """``error.type`` and the ERROR status, in one call (the conventions' error recording)."""
        if self._end_time is None:
            self._values["error.type"] = error_type
            self._status = Status(StatusCode.ERROR, description)

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is not None:
            return
        if not isinstance(self._events, list):
            self._events = []
        self._events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, attributes))

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The exception's type and message as an ``exception`` event (no stack trace: it may
        hold a prompt or a key in a local's repr)."""
        event: dict[str, types.AnyValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.escaped": str(escaped),
        }
        event.update(attributes or {})
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._on_end(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None:
            self.fail(type(exc_val).__qualname__)
        self.end()

    def __repr__(self) -> str:
        return f'VaporaSpan(name="{self._name}", context={self._context})'


class SpanStarter:
    """Starts :class:`VaporaSpan` s with one SDK tracer's sampler, ids, processors, resource."""

    def __init__(self, tracer: SdkTracer) -> None:
        self.tracer = tracer
        self.sampler = tracer.sampler
        self.processor = tracer.span_processor
        self.resource = tracer.resource
        self.scope = tracer._instrumentation_scope
        self.new_trace_id = tracer.id_generator.generate_trace_id
        self.new_span_id = tracer.id_generator.generate_span_id
        self.random_ids = tracer.id_generator.is_trace_id_random()
        limits = tracer._span_limits
        self.max_links = limits.max_links if limits.max_links is not None else 128
        # A sampled parent decides by itself (vapora's ParentBased(ALWAYS_ON) or ratio sampler).
        self.parent_decides = isinstance(self.sampler, ParentBased) and (
            self.sampler._remote_parent_sampled is ALWAYS_ON
            and self.sampler._local_parent_sampled is ALWAYS_ON
        )
        # A new trace is always sampled (ParentBased(ALWAYS_ON), the 100 % setting): decided
        # here, with the flags and empty trace state the sampler would give (ids from the SDK's
        # random generator, never the invalid zero).
        self.root_sampled = (
            self.parent_decides
            and getattr(self.sampler, "_root", None) is ALWAYS_ON
            and type(tracer.id_generator) is RandomIdGenerator
        )
        self.root_flags = _SAMPLED_RANDOM if self.random_ids else _SAMPLED
        self.root_dropped_flags = _UNSAMPLED_RANDOM if self.random_ids else _UNSAMPLED
        # A parent sampled out drops its children by itself (ParentBased's default ALWAYS_OFF).
        self.parent_drops = isinstance(self.sampler, ParentBased) and (
            self.sampler._remote_parent_not_sampled is ALWAYS_OFF
            and self.sampler._local_parent_not_sampled is ALWAYS_OFF
        )
        # A new trace under ParentBased(TraceIdRatioBased) (a ratio below 100 %): decided
        # here by the ratio sampler's own rule, the trace id's low 64 bits against its bound.
        root = getattr(self.sampler, "_root", None)
        self.root_bound: int | None = (
            root.bound
            if self.parent_decides
            and self.parent_drops
            and type(root) is TraceIdRatioBased
            and type(tracer.id_generator) is RandomIdGenerator
            else None
        )
        # The provider's processors, called directly: the ones whose on_start does something,
        # and the one on_end (or the provider's loop over several). Re-read when one is added.
        self._seen: object = None
        self.on_starts: tuple[Any, ...] = ()
        self.on_end: Any = self.processor.on_end
        self._processors()

    def _processors(self) -> tuple[Any, ...]:
        processors = getattr(self.processor, "_span_processors", None)
        if processors is self._seen:
            return self.on_starts
        self._seen = processors
        if processors is None:  # not the SDK's multi-processor: through it, as it is
            self.on_starts = (self.processor.on_start,)
            self.on_end = self.processor.on_end
            return self.on_starts
        self.on_starts = tuple(
            p.on_start for p in processors if type(p).on_start not in _QUIET_STARTS
        )
        self.on_end = processors[0].on_end if len(processors) == 1 else self.processor.on_end
        return self.on_starts

    def start(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent: SpanContext | None,
        links: Sequence[Link] = (),
    ) -> trace_api.Span:
        """A started span under ``parent`` (a new trace when it is None or invalid); a
        non-recording span carrying the new context when the sampler drops it."""
        # A SpanContext is a tuple: (trace_id, span_id, is_remote, trace_flags, trace_state,
        # is_valid); its properties read those items, here read directly.
        if parent is not None and parent[5]:
            trace_flags = parent[3]
            if self.parent_decides and trace_flags & _SAMPLED_BIT:
                flags = _SAMPLED_RANDOM if trace_flags & _RANDOM_BIT else _SAMPLED
                context = _local_context(parent[0], self.new_span_id(), flags, parent[4])
                return self._open(name, context, parent, kind, attributes, links, None)
            if self.parent_drops and not trace_flags & _SAMPLED_BIT:
                # Dropped as the sampler would: the parent's trace and state, a new span id.
                flags = _UNSAMPLED_RANDOM if trace_flags & _RANDOM_BIT else _UNSAMPLED
                context = _local_context(parent[0], self.new_span_id(), flags, parent[4])
                return trace_api.NonRecordingSpan(context)
            return self._sampled(name, kind, attributes, parent, parent.trace_id, links)
        if self.root_sampled:
            context = _local_context(
                self.new_trace_id(), self.new_span_id(), self.root_flags, DEFAULT_TRACE_STATE
            )
            return self._open(name, context, None, kind, attributes, links, None)
        if self.root_bound is not None:
            trace_id = self.new_trace_id()
            if trace_id & _TRACE_ID_LIMIT < self.root_bound:
                context = _local_context(
                    trace_id, self.new_span_id(), self.root_flags, DEFAULT_TRACE_STATE
                )
                return self._open(name, context, None, kind, attributes, links, None)
            context = _local_context(
                trace_id, self.new_span_id(), self.root_dropped_flags, DEFAULT_TRACE_STATE
            )
            return trace_api.NonRecordingSpan(context)
        return self._sampled(name, kind, attributes, None, self.new_trace_id(), links)

    def _open(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: Sequence[Link],
        parent_context: Any,
    ) -> VaporaSpan:
        """The recording span, handed to the processors' ``on_start``."""
        starts = self._processors()
        span = VaporaSpan(self, name, context, parent, kind, attributes, links)
        for on_start in starts:
            on_start(span, parent_context=parent_context)
        return span

    def _sampled(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        parent: SpanContext | None,
        trace_id: int,
        links: Sequence[Link],
    ) -> trace_api.Span:
        # A new trace has an empty parent context: None would have the sampler look at the
        # span current in the caller, as the SDK's start_span(context=None) does.
        parent_context = (
            trace_api.set_span_in_context(trace_api.NonRecordingSpan(parent))
            if parent is not None
            else _NO_PARENT
        )
        result = self.sampler.should_sample(parent_context, trace_id, name, kind, attributes, links)
        random = parent.trace_flags.random_trace_id if parent is not None else self.random_ids
        flags = (
            TraceFlags.SAMPLED
            if result.decision is Decision.RECORD_AND_SAMPLE
            else TraceFlags.DEFAULT
        )
        if random:
            flags |= TraceFlags.RANDOM_TRACE_ID
        context = SpanContext(
            trace_id, self.new_span_id(), False, TraceFlags(flags), result.trace_state
        )
        if result.decision is Decision.DROP:
            return trace_api.NonRecordingSpan(context)
        if result.attributes:
            attributes.update(result.attributes)
        return self._open(name, context, parent, kind, attributes, links, parent_context)


def _lean_enough(tracer: SdkTracer) -> bool:
    limits = tracer._span_limits
    within_defaults = (
        limits.max_span_attribute_length is None
        and (limits.max_span_attributes or 0) >= (_DEFAULTS.max_span_attributes or 0)
        and (limits.max_links or 0) >= (_DEFAULTS.max_links or 0)
        and (limits.max_events or 0) >= (_DEFAULTS.max_events or 0)
    )
    metrics = type(getattr(tracer, "_tracer_metrics", None)).__name__
    enabled = getattr(tracer, "_is_enabled", lambda: True)()
    return within_defaults and metrics in ("NoOpTracerMetrics", "NoneType") and enabled


def starter_for(tracer: trace_api.Tracer) -> SpanStarter | None:
    """vapora's span starter for ``tracer``, or None where the SDK's own path must be used."""
    if not isinstance(tracer, SdkTracer):
        return None
    try:
        if _lean_enough(tracer):
            return SpanStarter(tracer)
    except AttributeError:  # an SDK whose internals moved: its own path still works
        log.debug("telemetry: the SDK's tracer changed shape; using Tracer.start_span")
    return None
