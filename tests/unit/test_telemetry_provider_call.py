"""The provider call's GenAI span and metrics when the call does not succeed: cancelled while the
provider had it (the provider actor records a ``call_failed`` of class ``cancelled``), and a
stream that broke after its first chunk (billed, with a time to that chunk)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from events.contract import Usage
from tests.integration import telemetry_harness
from tests.samples import PRICE
from vapora.pricing import cost
from vapora.providers import ProviderRequest, StreamBroken
from vapora.telemetry.genai import CallSpec, ProviderCallTelemetry


def _spec(stream: bool) -> CallSpec:
    return CallSpec(
        provider="claude",
        kind="anthropic",
        model="claude-opus-4-5",
        server_address="api.anthropic.com",
        server_port=443,
        request=ProviderRequest(prompt="hi", price=PRICE),
        stream=stream,
        task_id="t1",
        task_type="CodeGeneration",
        attempt=1,
        price=PRICE,
    )


class Recorded(telemetry_harness.Recorded):
    """The provider call's span and metric points, as recorded."""

    def span(self) -> ReadableSpan:
        [span] = self.spans.get_finished_spans()
        return span

    def points(self) -> dict[str, list[tuple[dict[str, object], object]]]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        out: dict[str, list[tuple[dict[str, object], object]]] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        out.setdefault(metric.name, []).append((dict(point.attributes), point))
        return out


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    yield from telemetry_harness.recording(Recorded)


@pytest.mark.anyio
async def test_a_cancelled_call_fails_its_span_and_is_counted_as_cancelled(
    recorded: Recorded,
) -> None:
    # Async, on the suite's runner: anyio.run() here fails when a session fixture's loop runs.
    with anyio.CancelScope() as scope, ProviderCallTelemetry(_spec(stream=False)):
        scope.cancel()
        await anyio.sleep(10)
    span = recorded.span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "cancelled"
    assert span.attributes["vapora.error.class"] == "cancelled"
    points = recorded.points()
    # As the event log's call_failed (class cancelled): one request, its duration and latency.
    [(labels, requests)] = points["vapora_llm_provider_requests_total"]
    assert labels["status"] == "cancelled" and requests.value == 1  # type: ignore[attr-defined]
    [(labels, duration)] = points["gen_ai.client.operation.duration"]
    assert labels["error.type"] == "cancelled" and duration.count == 1  # type: ignore[attr-defined]
    [(_, latency)] = points["vapora_llm_provider_latency_seconds"]
    assert latency.count == 1  # type: ignore[attr-defined]
    assert "vapora_llm_spend_usd_total" not in points  # nothing billed is known


def test_a_stream_broken_after_its_first_chunk_is_billed_on_its_span(recorded: Recorded) -> None:
    usage = Usage(input_tokens=120, output_tokens=7, cache_read_tokens=100, cache_write_tokens=10)
    billed = cost(usage, PRICE)
    broken = StreamBroken(
        "connection reset (after 3 chunks)",
        partial_text="abc",
        first_token_ms=250.0,
        provider="claude",
        error_type="connection",
        usage=usage,
    )
    with pytest.raises(StreamBroken), ProviderCallTelemetry(_spec(stream=True)):
        raise broken
    a = recorded.span().attributes
    assert a["vapora.cost_usd"] == str(billed) and billed > 0
    assert a["gen_ai.usage.input_tokens"] == 120 and a["gen_ai.usage.output_tokens"] == 7
    assert a["gen_ai.usage.cache_read.input_tokens"] == 100
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 10
    assert a["gen_ai.response.time_to_first_chunk"] == 0.25
    points = recorded.points()
    [(labels, first)] = points["gen_ai.client.operation.time_to_first_chunk"]
    assert first.count == 1 and first.sum == 0.25  # type: ignore[attr-defined]
    # Labelled as the call's duration is (it had no error type: v1.41 requires it on failure).
    [(duration_labels, _)] = points["gen_ai.client.operation.duration"]
    assert labels == duration_labels and labels["error.type"] == "connection"
    [(_, spend)] = points["vapora_llm_spend_usd_total"]
    assert Decimal(str(spend.value)) == billed  # type: ignore[attr-defined]


def test_a_call_failed_before_anything_was_billed_has_no_cost_or_usage(
    recorded: Recorded,
) -> None:
    with pytest.raises(StreamBroken), ProviderCallTelemetry(_spec(stream=True)):
        raise StreamBroken("cut", partial_text="", provider="claude", error_type="connection")
    a = recorded.span().attributes
    assert "vapora.cost_usd" not in a and "gen_ai.usage.input_tokens" not in a
    assert "gen_ai.response.time_to_first_chunk" not in a  # no time measured
