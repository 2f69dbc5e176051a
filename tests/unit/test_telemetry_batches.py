"""Spans for events handled together (actors.tracing): one PRODUCER span for events appended
together, one CONSUMER span per trace for a projection's live batch (parented by the first
event's creation context, linked to the others'), unsampled events skipped, and the same with
a propagator other than W3C trace context."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from actors import tracing
from actors.eventlog import LogEntry
from tests.samples import EVENTS

WILDCARD = "vapora.events.>"


def _entry(seq: int, tag: str, headers: Mapping[str, str]) -> LogEntry[Any]:
    block = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    subject = f"vapora.events.{tag.split('_')[0]}"
    return LogEntry(seq=seq, subject=subject, event=EVENTS[tag], raw_headers=block.encode())


def _traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def test_a_live_batch_is_one_span_per_trace_parented_by_the_first_and_linked_to_the_rest(
    spans: InMemorySpanExporter,
) -> None:
    batch = [
        _entry(1, "route_decided", {"traceparent": _traceparent(0xA, 0x1)}),
        _entry(2, "route_decided", {"traceparent": _traceparent(0xB, 0x5)}),
        _entry(3, "call_succeeded", {"traceparent": _traceparent(0xA, 0x2)}),
        _entry(4, "spend_recorded", {"traceparent": _traceparent(0xA, 0x2)}),
        _entry(5, "call_failed", {"traceparent": _traceparent(0xC, 0x7, sampled=False)}),
        _entry(6, "fallback_triggered", {}),  # no trace context: no span
    ]
    with tracing.processed(batch, group="ledger", replay=False, destination=WILDCARD):
        pass
    finished = spans.get_finished_spans()
    made = {s.context.trace_id: s for s in finished}
    assert set(made) == {0xA, 0xB} and len(finished) == 2  # none for the unsampled, the bare
    a, b = made[0xA], made[0xB]
    assert a.parent is not None and a.parent.span_id == 0x1 and a.parent.is_remote
    assert [link.context.span_id for link in a.links] == [0x2]  # once, though two events
    assert a.attributes is not None and a.attributes["messaging.batch.message_count"] == 3
    assert list(a.attributes["vapora.event.ids"]) == [e.event.id for e in batch[0:4:2]] + [
        batch[3].event.id
    ]
    assert a.name == f"process {WILDCARD}" and a.kind is SpanKind.CONSUMER
    assert b.parent is not None and b.parent.span_id == 0x5 and not b.links
    assert b.attributes is not None and b.attributes["messaging.message.id"] == batch[1].event.id
    assert b.name == "process vapora.events.route"


class _OwnPropagator(TextMapPropagator):
    """A non-W3C propagator: the context in one ``x-ctx`` header, ``trace:span:flags``."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        values = getter.get(carrier, "x-ctx")
        if not values:
            return context or Context()
        trace_id, span_id, flags = (int(part, 16) for part in values[0].split(":"))
        parent = SpanContext(trace_id, span_id, True, TraceFlags(flags))
        return trace.set_span_in_context(NonRecordingSpan(parent), context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        value = (
            f"{span_context.trace_id:x}:{span_context.span_id:x}:{int(span_context.trace_flags):x}"
        )
        setter.set(carrier, "x-ctx", value)  # type: ignore[arg-type]

    @property
    def fields(self) -> set[str]:
        return {"x-ctx"}


def test_with_another_propagator_the_live_batch_is_read_through_it(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", _OwnPropagator())
    batch = [
        _entry(1, "route_decided", {"x-ctx": "a:1:1"}),
        _entry(2, "call_succeeded", {"x-ctx": "a:2:1"}),
        _entry(3, "call_failed", {"x-ctx": "b:3:0"}),
    ]
    with tracing.processed(batch, group="ledger", replay=False, destination=WILDCARD):
        pass
    [span] = spans.get_finished_spans()
    assert span.context.trace_id == 0xA and span.parent is not None and span.parent.span_id == 1
    assert [link.context.span_id for link in span.links] == [2]


def test_events_appended_together_to_several_subjects_are_one_batch_send(
    spans: InMemorySpanExporter,
) -> None:
    appends = [
        ("vapora.events.call.openai", "e-1", "call_succeeded"),
        ("vapora.events.spend.openai", "e-2", "spend_recorded"),
    ]
    span, headers = tracing.start_publish_batch(appends, WILDCARD)
    tracing.end_publish(span, None)
    same, _ = tracing.start_publish_batch(appends[:1] * 2, WILDCARD)
    tracing.end_publish(same, None)
    mixed, together = spans.get_finished_spans()
    assert mixed.name == "publish" and mixed.kind is SpanKind.PRODUCER
    assert mixed.attributes is not None
    assert mixed.attributes["messaging.destination.name"] == WILDCARD
    assert mixed.attributes["messaging.batch.message_count"] == 2
    assert list(mixed.attributes["vapora.event.ids"]) == ["e-1", "e-2"]
    assert list(mixed.attributes["vapora.event.types"]) == ["call_succeeded", "spend_recorded"]
    assert "messaging.message.id" not in mixed.attributes
    expected = _traceparent(mixed.context.trace_id, mixed.context.span_id)
    assert headers["traceparent"][:52] == expected[:52]  # flags: sampled, maybe random too
    assert int(headers["traceparent"][53:], 16) & 1
    assert together.name == "publish vapora.events.call.openai"
