"""The histograms' fast path (vapora.telemetry.histograms) gives what the SDK's own ``record``
gives: the same points, buckets, sums, minimums, maximums and exemplars, with cumulative and
delta readers, and it really skips the SDK after an attribute set's first measurement."""

from __future__ import annotations

import math
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics._internal.instrument import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.trace import TracerProvider

from vapora.telemetry.histograms import Histogram

BUCKETS = [0.0, 0.5, 1.0, 5.0, 10.0]
SETS = [
    {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o", "server.port": 443},
    {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude", "ok": True},
    {"provider": "ollama"},
]
VALUES = [0.2, 3.0, 0.0, 7.5, 12.0, 0.5, -1.0, math.nan, math.inf, 1.0, 4.2, 9.9, 2.0, 0.7]


def _points(reader: InMemoryMetricReader) -> list[tuple[Any, ...]]:
    data = reader.get_metrics_data()
    out = []
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    exemplars = sorted(
                        (e.value, e.span_id, tuple(sorted((e.filtered_attributes or {}).items())))
                        for e in p.exemplars
                    )
                    out.append(
                        (
                            metric.name,
                            tuple(sorted(p.attributes.items())),
                            p.count,
                            p.sum,
                            tuple(p.bucket_counts),
                            p.min,
                            p.max,
                            tuple(exemplars),
                        )
                    )
    return sorted(out, key=repr)


def _pair(**kwargs: Any) -> tuple[Histogram, Any, InMemoryMetricReader, InMemoryMetricReader]:
    readers = []
    made = []
    for _ in range(2):
        reader = InMemoryMetricReader(**kwargs.get("reader", {}))
        provider = MeterProvider(
            metric_readers=[reader],
            views=kwargs.get("views", ()),
            exemplar_filter=kwargs.get("exemplar_filter"),
        )
        histogram = provider.get_meter("t").create_histogram(
            "h", unit="s", explicit_bucket_boundaries_advisory=BUCKETS
        )
        readers.append(reader)
        made.append(histogram)
    return Histogram(made[0]), made[1], readers[0], readers[1]


@pytest.mark.parametrize("temporality", [None, AggregationTemporality.DELTA])
def test_the_fast_path_collects_what_the_sdk_collects(
    temporality: AggregationTemporality | None,
) -> None:
    reader = {"preferred_temporality": {SdkHistogram: temporality}} if temporality else {}
    fast, sdk, fast_reader, sdk_reader = _pair(reader=reader)
    for round_ in range(3):
        for i, value in enumerate(VALUES):
            attributes = SETS[i % len(SETS)]
            fast.record(value * (round_ + 1), i % len(SETS), attributes)
            sdk.record(value * (round_ + 1), attributes)
        assert _points(fast_reader) == _points(sdk_reader)  # a collection between rounds


def test_after_an_attribute_sets_first_measurement_the_sdk_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, _, fast_reader, _ = _pair()
    calls = []
    original = fast.sdk.record
    monkeypatch.setattr(fast.sdk, "record", lambda *a, **k: (calls.append(a), original(*a, **k)))
    for i in range(30):
        fast.record(float(i), i % 3, SETS[i % 3])
    assert len(calls) == 3  # one per attribute set
    [(_, _, count, *_)] = [p for p in _points(fast_reader) if p[1] == (("provider", "ollama"),)]
    assert count == 10


def test_views_that_keep_some_attributes_and_exemplars_of_sampled_spans_match_the_sdk() -> None:
    views = [View(instrument_name="h", attribute_keys={"gen_ai.provider.name"})]
    fast, sdk, fast_reader, sdk_reader = _pair(
        views=views, exemplar_filter=TraceBasedExemplarFilter()
    )
    tracer = TracerProvider().get_tracer("t")
    for i, value in enumerate(VALUES):
        with tracer.start_as_current_span(f"s{i}"):
            fast.record(value, i % 2, SETS[i % 2])
            sdk.record(value, SETS[i % 2])
    fast_points = _points(fast_reader)
    assert fast_points == _points(sdk_reader)
    assert any(p[7] for p in fast_points), "no exemplar was recorded"


def test_a_set_that_cannot_be_bound_is_not_looked_at_again_until_the_readers_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = {"preferred_temporality": {SdkHistogram: AggregationTemporality.DELTA}}
    fast, sdk, fast_reader, sdk_reader = _pair(reader=reader)
    looks = []
    bind = fast._bind
    monkeypatch.setattr(fast, "_bind", lambda *a: (looks.append(a[0]), bind(*a)))
    for i in range(20):
        fast.record(float(i), "k", SETS[0])
        sdk.record(float(i), SETS[0])
    assert looks == ["k"]  # a delta reader: tried once, then the SDK records it
    assert _points(fast_reader) == _points(sdk_reader)


def test_when_the_sdks_internals_move_every_measurement_goes_through_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, sdk, fast_reader, sdk_reader = _pair()
    for i in range(3):
        fast.record(float(i), "bound", SETS[0])
        sdk.record(float(i), SETS[0])

    # A later set finds the internals changed (here: the SDK's attribute hashing takes other
    # arguments).
    def moved(*args: Any) -> Any:
        raise TypeError("_hash_attributes() takes 2 positional arguments")

    monkeypatch.setattr(fast, "_hash", moved)
    fast.record(1.0, "other", SETS[1])
    sdk.record(1.0, SETS[1])
    assert fast._consumer is None and not fast._bound
    for i in range(3):  # the set bound before goes through the SDK too, without failing
        fast.record(float(i), "bound", SETS[0])
        sdk.record(float(i), SETS[0])
    assert _points(fast_reader) == _points(sdk_reader)
