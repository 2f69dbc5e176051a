"""vapora's own spans (vapora.telemetry.spans), hand-written W3C headers (w3c) and the direct OTLP
encoder (otlp) give what the OpenTelemetry SDK's own paths give, field by field."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceFlags, TraceState

from actors import tracing
from vapora.telemetry import w3c
from vapora.telemetry.otlp import _Encoder, encode_spans
from vapora.telemetry.spans import VaporaSpan, starter_for
from vapora.telemetry.state import STATE

ODD_ATTRIBUTES = {
    "s": "subject",
    "unicode": "größe ✓",
    "empty": "",
    "yes": True,
    "no": False,
    "one": 1,
    "negative": -42,
    "big": 2**62,
    "float": 0.25,
    "strings": ("stop", "length"),
    "ints": (1, 2, 3),
    "bools": (True, False),
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "vapora-t", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use(provider)
    yield spans
    tracing.use(None)


def _remote_headers(sampled: bool = True, state: str | None = None) -> dict[str, str]:
    headers = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-{'01' if sampled else '00'}"}
    if state:
        headers["tracestate"] = state
    return headers


def _varied_spans() -> None:
    """Spans of every shape vapora makes, plus the API's rarer calls."""
    with tracing.process_span("vapora.complete", _remote_headers(state="k=v,x=y"), group="router"):
        with tracing.publish_span("vapora.provider.claude.call") as span:
            span.set_attributes(ODD_ATTRIBUTES)
            span.add_event("retry", {"attempt": 2})
            span.set_status(StatusCode.ERROR, "overloaded")
        published, _ = tracing.start_publish("vapora.events.route", msg_id="e-1", event_type="x")
        tracing.end_publish(published, TimeoutError("no ack"))
    state = TraceState([("a", "b")])
    replay_link = Link(trace.SpanContext(7, 9, True, TraceFlags(1), state), {"why": "replay"})
    root = STATE.start_span("process vapora.events.>", SpanKind.CONSUMER, {}, None, [replay_link])
    root.end()


def test_vapora_spans_are_recorded_with_the_sdks_resource_scope_sampler_and_parents(
    exporter: InMemorySpanExporter,
) -> None:
    _varied_spans()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert all(isinstance(s, VaporaSpan) for s in spans.values())
    process = spans["process vapora.complete"]
    call = spans["publish vapora.provider.claude.call"]
    assert process.parent is not None and process.parent.is_remote
    assert process.parent.span_id == 0xCDCDCDCDCDCDCDCD
    assert process.context.trace_id == int("ab" * 16, 16)
    assert process.context.trace_state == TraceState([("k", "v"), ("x", "y")])
    assert call.parent is not None and call.parent.span_id == process.context.span_id
    assert not call.parent.is_remote
    assert call.status.status_code is StatusCode.ERROR
    assert [e.name for e in call.events] == ["retry"]
    failed = spans["publish vapora.events.route"]
    assert failed.attributes["error.type"] == "TimeoutError"
    assert failed.status.status_code is StatusCode.ERROR
    assert process.resource.attributes["service.name"] == "vapora-t"
    assert process.instrumentation_scope is not None
    assert process.instrumentation_scope.name == "vapora"
    replay = spans["process vapora.events.>"]
    assert replay.parent is None and replay.links[0].context.span_id == 9
    assert all(s.end_time >= s.start_time > 0 for s in spans.values())  # type: ignore[operator]


def test_an_ended_vapora_span_takes_no_more_changes(exporter: InMemorySpanExporter) -> None:
    with tracing.publish_span("x") as span:
        span.set_attribute("before", 1)
    span.set_attribute("after", 2)
    span.set_status(StatusCode.ERROR)
    span.end()  # a second end exports nothing more
    [recorded] = exporter.get_finished_spans()
    assert dict(recorded.attributes or {}) == {
        **dict(recorded.attributes or {}),
        "before": 1,
    } and "after" not in (recorded.attributes or {})
    assert recorded.status.status_code is StatusCode.UNSET


def test_a_sampler_that_drops_roots_gives_a_non_recording_span_that_still_carries_the_trace() -> (
    None
):
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use(provider)
    try:
        with tracing.request_span("vapora.complete") as headers:
            pass
    finally:
        tracing.use(None)
    assert spans.get_finished_spans() == ()
    assert headers is not None
    assert int(headers["traceparent"].split("-")[3], 16) & 1 == 0  # travels, not sampled


def test_a_new_trace_at_100_percent_has_the_context_the_sdks_sampler_gives() -> None:
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    class Counting(IdGenerator):  # not random: vapora's own root decision is not taken
        def generate_span_id(self) -> int:
            return 7

        def generate_trace_id(self) -> int:
            return 5

    for ids, decided_by_vapora in ((None, True), (Counting(), False)):
        provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), id_generator=ids)
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        starter = starter_for(provider.get_tracer("vapora"))
        assert starter is not None and starter.root_sampled is decided_by_vapora
        ours = starter.start("root", SpanKind.PRODUCER, {}, None).get_span_context()
        theirs = provider.get_tracer("sdk").start_span("root").get_span_context()
        assert ours.is_valid and theirs.is_valid and not ours.is_remote
        assert ours.trace_flags == theirs.trace_flags and ours.trace_state == theirs.trace_state
        assert type(ours.trace_state) is type(theirs.trace_state)


def test_a_ratio_sampled_trace_is_decided_as_the_sdks_tracer_decides_it() -> None:
    """Below 100 %, vapora decides a new trace (and a child of an unsampled parent) without
    calling the sampler: for the same trace ids, the same decision, flags and trace state as
    the SDK's tracer with the same sampler."""
    import random

    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Given(RandomIdGenerator):  # the SDK's random generator, told which id comes next
        next_trace_id = 0

        def generate_trace_id(self) -> int:
            return self.next_trace_id

    rng = random.Random(3)
    ids = [rng.getrandbits(128) | 1 for _ in range(400)]
    ids += [1, 2**64 - 1, 2**64, 2**128 - 1]  # the edges of the low 64 bits
    for ratio, expected in ((0.0, (0, 0)), (1.0, (404, 404)), (0.25, (60, 140))):
        sampled = _ratio_decisions(Given, ids, ratio)
        assert expected[0] <= sampled <= expected[1], (ratio, sampled)


def _ratio_decisions(given_type: type, ids: list[int], ratio: float) -> int:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    starter = starter_for(provider.get_tracer("vapora"))
    # vapora's own decisions are the ones checked: for new traces and for unsampled parents.
    assert starter is not None and starter.root_bound is not None and starter.parent_drops
    given = given_type()
    sdk = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)), id_generator=given)
    sampled = 0
    for trace_id in ids:
        starter.new_trace_id = lambda trace_id=trace_id: trace_id  # type: ignore[misc]
        ours = starter.start("root", SpanKind.PRODUCER, {}, None)
        given.next_trace_id = trace_id
        theirs = sdk.get_tracer("sdk").start_span("root")
        assert ours.is_recording() is theirs.is_recording(), hex(trace_id)
        ours_context, their_context = ours.get_span_context(), theirs.get_span_context()
        assert ours_context.trace_id == their_context.trace_id == trace_id
        assert ours_context.trace_flags == their_context.trace_flags
        assert ours_context.trace_state == their_context.trace_state
        sampled += ours.is_recording()
        ours.end()
    # A child of an unsampled parent: dropped, in the parent's trace, with its trace state.
    flags = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
    parent = trace.SpanContext(5, 6, True, flags, TraceState([("k", "v")]))
    child = starter.start("child", SpanKind.CONSUMER, {}, parent)
    sdk_child = sdk.get_tracer("sdk").start_span(
        "child", context=trace.set_span_in_context(trace.NonRecordingSpan(parent))
    )
    assert not child.is_recording() and not sdk_child.is_recording()
    ours_context, their_context = child.get_span_context(), sdk_child.get_span_context()
    assert ours_context.trace_id == their_context.trace_id == 5
    assert ours_context.trace_flags == their_context.trace_flags
    assert ours_context.trace_state == their_context.trace_state == parent.trace_state
    assert not ours_context.is_remote and ours_context.span_id not in (0, 6)
    return sampled


def test_a_new_trace_is_sampled_as_a_root_whatever_span_is_current() -> None:
    """A span started with no parent begins a new trace: the sampler is asked about a root, not
    about the span current in the caller (the SDK's start_span with an empty context)."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    starter = starter_for(provider.get_tracer("vapora"))
    assert starter is not None and not starter.root_sampled and starter.root_bound is None
    current = trace.NonRecordingSpan(trace.SpanContext(5, 6, False, TraceFlags(1)))
    token = otel_context.attach(trace.set_span_in_context(current))
    try:
        ours = starter.start("root", SpanKind.PRODUCER, {}, None)
        theirs = provider.get_tracer("sdk").start_span("root", context=otel_context.Context())
    finally:
        otel_context.detach(token)
    assert not ours.is_recording() and not theirs.is_recording()
    assert ours.get_span_context().trace_id != 5


def test_hand_written_headers_match_the_sdk_propagator() -> None:
    parent = trace.SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        False,
        TraceFlags(TraceFlags.SAMPLED),
        TraceState([("vendor", "abc")]),
    )
    span = trace.NonRecordingSpan(parent)
    ours: dict[str, str] = {}
    w3c.inject(ours, span)
    theirs: dict[str, str] = {}
    propagate.inject(theirs, context=trace.set_span_in_context(span))
    assert ours == theirs
    for headers in (
        theirs,
        {"traceparent": theirs["traceparent"]},
        {"traceparent": theirs["traceparent"].upper()},  # invalid: not lowercase hex
        {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},  # invalid: zero trace id
        {"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"},
        {"traceparent": " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        {"other": "x"},
        {},
    ):
        ours_span = trace.get_current_span(w3c.extract(headers)).get_span_context()
        sdk_span = trace.get_current_span(propagate.extract(headers)).get_span_context()
        assert ours_span == sdk_span, headers
        assert ours_span.trace_state == sdk_span.trace_state


def test_baggage_travels_through_the_propagator_when_there_is_some() -> None:
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        headers: dict[str, str] = {}
        w3c.inject(headers, trace.NonRecordingSpan(trace.SpanContext(1, 2, False, TraceFlags(1))))
    finally:
        otel_context.detach(token)
    assert headers["baggage"] == "tenant=acme"
    assert baggage.get_baggage("tenant", w3c.extract(headers)) == "acme"


def _both_encodings(spans: list[ReadableSpan]) -> tuple[ExportTraceServiceRequest, object]:
    return ExportTraceServiceRequest.FromString(encode_spans(spans)), sdk_encode(spans)


def test_the_otlp_encoding_equals_the_sdks_for_vapora_spans(
    exporter: InMemorySpanExporter,
) -> None:
    _varied_spans()
    spans = list(exporter.get_finished_spans())
    ours, theirs = _both_encodings(spans)
    assert ours == theirs
    assert len(ours.resource_spans[0].scope_spans[0].spans) == len(spans) == 4


def test_the_otlp_encoding_equals_the_sdks_for_the_sdks_own_spans() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "x"}, schema_url="https://s/1"))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("other", "1.2.3", schema_url="https://scope/1")
    remote = trace.set_span_in_context(
        trace.NonRecordingSpan(trace.SpanContext(5, 6, True, TraceFlags(1)))
    )
    with tracer.start_as_current_span("root", context=remote, attributes=ODD_ATTRIBUTES) as root:
        root.record_exception(ValueError("bad"))
        link = Link(root.get_span_context(), {"a": "b"})
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT, links=[link]) as child:
            child.set_status(StatusCode.OK)
    ours, theirs = _both_encodings(list(spans.get_finished_spans()))
    assert ours == theirs


def test_the_encoder_reuses_attribute_encodings_without_mixing_types_or_fields(
    exporter: InMemorySpanExporter,
) -> None:
    encoder = _Encoder()
    for value in (True, 1, "1", 1.0):  # equal or alike in Python, different on the wire
        exporter.clear()
        with tracing.publish_span("x") as span:
            span.set_attribute("v", value)
            span.add_event("e", {"v": value})
        spans = list(exporter.get_finished_spans())
        first = ExportTraceServiceRequest.FromString(encode_spans(spans, encoder))
        again = ExportTraceServiceRequest.FromString(encode_spans(spans, encoder))
        assert first == again == sdk_encode(spans), value
    for n in range(600):  # a key with many values stops being remembered, and stays right
        exporter.clear()
        with tracing.publish_span("x", msg_id=f"id-{n}" * (1 + n % 70)) as span:
            span.set_attribute("count", (n - 300) * 2**n % 2**63 - 2**62)  # ints of every size
            span.set_attribute("ratio", n / 7)
        spans = list(exporter.get_finished_spans())
        assert ExportTraceServiceRequest.FromString(encode_spans(spans, encoder)) == sdk_encode(
            spans
        )
    assert encoder.attributes.fields[9]["messaging.message.id"].values is None


def test_the_encoder_writes_sequences_as_the_sdk_does_remembered_or_not(
    exporter: InMemorySpanExporter,
) -> None:
    encoder = _Encoder()
    samples: list[object] = [
        ["a", "b"],
        ("a", "b"),
        ["x" * 200, "é" * 70],  # lengths past one varint byte
        [],
        [1, 2],
        [True, 1],  # equal in Python to [1, 1], different on the wire
        [1, 1],
        (0.5, 2.0),
    ]
    for n in range(400):  # past what a key remembers: then written each time
        exporter.clear()
        with tracing.publish_span("x") as span:
            span.set_attribute("list", samples[n % len(samples)])  # type: ignore[arg-type]
            span.set_attribute("ids", [f"e-{n}-{i}" * (1 + n % 9) for i in range(n % 4)])
        spans = list(exporter.get_finished_spans())
        ours = ExportTraceServiceRequest.FromString(encode_spans(spans, encoder))
        assert ours == sdk_encode(spans), n
    assert encoder.attributes.fields[9]["ids"].values is None
    assert encoder.attributes.fields[9]["list"].values is not None


def test_the_installed_sdk_otlp_exporter_takes_the_direct_encoder() -> None:
    # If an SDK upgrade moves the internals it uses, export still works (the SDK encodes), but
    # slower by ~20 us a span: this says so.
    from vapora.telemetry.otlp import OtlpSpanExporter

    exporter = OtlpSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert exporter._direct
    # ... and POSTs through urllib3 (half the CPU of requests), with the TLS settings the SDK
    # would have given requests.
    assert type(exporter._client._transport).__name__ == "Urllib3HTTPTransport"
    exporter.shutdown()


def test_a_credential_provider_keeps_the_sdks_requests_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vapora.telemetry.otlp import _KEEP_REQUESTS, _urllib3_transport

    for name in (*_KEEP_REQUESTS, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert _urllib3_transport({}) is not None
    # HTTPS keeps the SDK's certificate handling; so do a credential provider (either variable)
    # and a proxy.
    assert _urllib3_transport({"endpoint": "https://collector:4318/v1/traces"}) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")
    assert _urllib3_transport({}) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    for name in _KEEP_REQUESTS:
        monkeypatch.setenv(name, "x")
        assert _urllib3_transport({}) is None, name
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    "block",
    [
        b"NATS/1.0\r\nNats-Msg-Id: e-1\r\ntraceparent: 00-"
        + b"ab" * 16
        + b"-"
        + b"cd" * 8
        + b"-01\r\n\r\n",
        b"NATS/1.0\r\ntraceparent:00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-00",
        b"NATS/1.0\r\ntraceparent: 00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01\r\n"
        b"tracestate: k=v\r\nbaggage: tenant=acme\r\n\r\n",
        b"NATS/1.0\r\nNats-Msg-Id: e-1\r\n\r\n",
        b"NATS/1.0\r\nx-traceparent: 00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01\r\n\r\n",
        b"",
        b"NATS/1.0\r\ntraceparent: 00-" + b"0" * 32 + b"-" + b"cd" * 8 + b"-01\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 00-" + b"ab" * 16 + b"-" + b"0" * 16 + b"-01\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 00-" + b"AB" * 16 + b"-" + b"cd" * 8 + b"-01\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 01-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01-later\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01-x\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-03\r\n\r\n",
    ],
)
def test_the_trace_context_read_from_a_raw_header_block_equals_the_parsed_one(
    block: bytes,
) -> None:
    from nats.aio.client import Client

    parsed = Client._parse_header_lines(block[block.find(b"\r\n") :]) if block else {}
    ours = w3c.extract_raw(block)
    theirs = propagate.extract(parsed)
    assert trace.get_current_span(ours).get_span_context() == (
        trace.get_current_span(theirs).get_span_context()
    )
    assert baggage.get_all(ours) == baggage.get_all(theirs)
    # The direct read gives the same parent, or says the full extraction is needed.
    parent = w3c.remote_parent(block)
    if parent is not w3c.NEEDS_EXTRACT:
        expected = trace.get_current_span(theirs).get_span_context()
        assert parent == (expected if expected.is_valid else None)
        if parent is not None:
            assert (parent.is_remote, parent.trace_state) == (True, expected.trace_state)
    # (NEEDS_EXTRACT: the callers use extract_raw, compared with the propagator above.)


def test_the_direct_read_is_taken_for_a_traceparent_alone_and_declined_otherwise() -> None:
    value = b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01"
    parent = w3c.remote_parent(
        b"NATS/1.0\r\nNats-Msg-Id: e-1\r\ntraceparent: " + value + b"\r\n\r\n"
    )
    assert parent is not w3c.NEEDS_EXTRACT and parent is not None
    assert (parent.trace_id, parent.span_id) == (int("ab" * 16, 16), int("cd" * 8, 16))
    assert parent.is_remote and parent.trace_flags.sampled
    for declined in (  # more context than a traceparent, or another version: the propagator
        b"NATS/1.0\r\ntraceparent: " + value + b"\r\ntracestate: k=v\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: " + value + b"\r\nbaggage: tenant=acme\r\n\r\n",
        b"NATS/1.0\r\ntraceparent: 01" + value[2:] + b"-later\r\n\r\n",
    ):
        assert w3c.remote_parent(declined) is w3c.NEEDS_EXTRACT, declined
    assert w3c.remote_parent(b"NATS/1.0\r\nNats-Msg-Id: e-1\r\n\r\n") is None
    assert w3c.remote_parent(b"") is None


def test_the_current_span_is_read_and_set_as_the_api_does() -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    from vapora.telemetry.context import attach_span, current_context, current_span, detach

    assert current_span() is trace.get_current_span() is trace.INVALID_SPAN
    span = NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(1)))
    with_baggage = baggage.set_baggage("k", "v")
    token = otel_context.attach(with_baggage)
    try:
        inner = attach_span(span)  # on top of the current context: its baggage stays
        assert current_span() is trace.get_current_span() is span
        assert baggage.get_baggage("k") == "v" and current_context() == otel_context.get_current()
        other = NonRecordingSpan(SpanContext(7, 8, False, TraceFlags(1)))
        nested = otel_context.attach(trace.set_span_in_context(other))  # the API's own attach
        assert current_span() is other
        otel_context.detach(nested)
        detach(inner)
        assert current_span() is trace.INVALID_SPAN and baggage.get_baggage("k") == "v"
        fresh = attach_span(span, otel_context.Context())  # on an empty context: no baggage
        assert current_span() is span and baggage.get_baggage("k") is None
        detach(fresh)
        odd = otel_context.attach(otel_context.set_value("current-span", "not a span"))
        assert current_span() is trace.get_current_span()
        otel_context.detach(odd)
        assert current_span(trace.set_span_in_context(span)) is span
    finally:
        otel_context.detach(token)


def test_set_attributes_skips_none_values_as_the_sdk_does(exporter: InMemorySpanExporter) -> None:
    with tracing.publish_span("x") as span:
        span.set_attributes({"a": 1, "b": None, "c": "x"})
        span.set_attributes({"d": 2.5})
    [finished] = exporter.get_finished_spans()
    assert finished.attributes is not None
    assert {k: finished.attributes[k] for k in ("a", "c", "d")} == {"a": 1, "c": "x", "d": 2.5}
    assert "b" not in finished.attributes


@pytest.mark.parametrize(
    "value",
    [
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-02",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-03",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-0g",
        "01-" + "ab" * 16 + "-" + "cd" * 8 + "-00",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00-x",
        "00-" + "0" * 32 + "-" + "cd" * 8 + "-01",
        "00-" + "ab" * 16 + "-" + "0" * 16 + "-01",
        "00-" + "AB" * 16 + "-" + "cd" * 8 + "-01",
        "",
    ],
)
def test_a_traceparent_read_directly_is_what_the_propagator_reads(value: str) -> None:
    # The ledger reads each stored event's traceparent once, directly: the same context as the
    # propagator's, or no context where it finds none, or "ask the propagator" (other versions).
    theirs = trace.get_current_span(propagate.extract({"traceparent": value})).get_span_context()
    ours = w3c.parse_traceparent(value.encode())
    if ours is w3c.NEEDS_EXTRACT:  # only what is not well-formed version 00: the caller then
        # asks the propagator (compared with it in the extraction tests)
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", value) is None
        return
    assert ours == (theirs if theirs.is_valid else None)
    if ours is not None:
        assert ours.is_remote and ours.trace_flags == theirs.trace_flags


def test_an_injected_span_keeps_its_headers_and_they_equal_the_propagators(
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    remote = NonRecordingSpan(
        SpanContext(0xAB, 0xCD, True, TraceFlags(0), TraceState([("k", "v")]))
    )
    for span in (remote, STATE.start_span("s", SpanKind.INTERNAL, {}, None, ())):
        ours: dict[str, str] = {}
        again: dict[str, str] = {}
        theirs: dict[str, str] = {}
        w3c.inject(ours, span)
        w3c.inject(again, span)  # from what the first call kept
        propagate.inject(theirs, context=trace.set_span_in_context(span))
        assert ours == again == theirs


def test_a_token_detached_twice_is_logged_as_the_api_does_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    from vapora.telemetry.context import attach_span, detach

    token = attach_span(NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(1))))
    detach(token)
    detach(token)  # the API logs "Failed to detach context" and carries on
    assert "Failed to detach context" in caplog.text
