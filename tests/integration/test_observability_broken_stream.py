"""A stream that broke after its first chunk was billed: its GenAI span says what (cost, tokens,
cache reads, as the ledger has them) and when the first chunk came, as a successful one's does.
Real nats-server, the simulator over HTTP, each actor on its own connection."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.trace import StatusCode

from events.log import SpendRecorded
from tests.integration.telemetry_harness import Recorded, guide, separate_deployment
from vapora.errors import ProviderError

pytestmark = pytest.mark.anyio


def _points(data: MetricsData | None, name: str) -> list[object]:
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_a_stream_broken_after_its_first_chunk_reports_what_it_billed(
    tmp_path: Path, recorded: Recorded
) -> None:
    model = "gemini-2.0-flash-cut-3-cached-4"  # 3 chunks, then the connection is cut
    async with separate_deployment(tmp_path, guide(models={"gemini": model})) as dep:
        recorded.spans.clear()
        with pytest.raises(ProviderError):
            async with dep.client.stream(
                prompt="write something long please", provider="gemini", max_tokens=30
            ) as stream:
                async for _ in stream:
                    pass
        await dep.ledger_caught_up()
        [spend] = [e for _, e, _ in await dep.events() if isinstance(e, SpendRecorded)]
        data = recorded.metrics.get_metrics_data()
    [span] = recorded.named(f"generate_content {model}")
    a = span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert a["vapora.error.class"] == "stream_broken"
    # What was billed, as the ledger has it and as the client was told.
    assert Decimal(str(a["vapora.cost_usd"])) == spend.cost_usd == stream.cost_usd > 0
    assert a["gen_ai.usage.input_tokens"] == spend.input_tokens
    assert a["gen_ai.usage.output_tokens"] == spend.output_tokens
    assert a["gen_ai.usage.cache_read.input_tokens"] == spend.cache_read_tokens == 4
    assert a["gen_ai.usage.cache_creation.input_tokens"] == spend.cache_write_tokens
    # The first chunk came: its time is on the span and in the histogram.
    first = a["gen_ai.response.time_to_first_chunk"]
    assert isinstance(first, float) and 0 < first < 10
    [point] = _points(data, "gen_ai.client.operation.time_to_first_chunk")
    assert point.count == 1 and point.sum == pytest.approx(first)  # type: ignore[attr-defined]
