"""``/metrics`` after a mixed run: the guide's six metrics with the guide's labels, spend and the
tier, and values that agree with the ledger and the log (issue 6)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anyio
import httpx
import pytest

from events.log import (
    BudgetTierChanged,
    CallFailed,
    CallSucceeded,
    FallbackTriggered,
    RouteDecided,
    SpendRecorded,
)
from tests.fault.provider_harness import config_text
from tests.integration.telemetry_harness import separate_deployment
from vapora.config import TelemetryConfig
from vapora.errors import VaporaError
from vapora.telemetry import Telemetry, setup
from vapora.telemetry.prometheus import render

pytestmark = pytest.mark.anyio

#: The guide's metrics.rs: name -> label names (histograms add ``le`` on their buckets).
GUIDE = {
    "vapora_llm_provider_requests_total": {"provider", "task_type", "status"},
    "vapora_llm_provider_latency_seconds_bucket": {"provider", "le"},
    "vapora_llm_provider_tokens_total": {"provider", "type"},
    "vapora_llm_routing_decisions_total": {"selected_provider", "task_type", "reason"},
    "vapora_llm_fallback_triggers_total": {"from_provider", "to_provider", "reason"},
    "vapora_llm_budget_enforcement_total": {"tier", "action"},
}
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    """The samples of a text exposition (comments checked for form, then skipped)."""
    samples = []
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* ", line), line
            continue
        match = _LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = dict(_LABEL.findall(match.group(2) or ""))
        samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def total(samples: list[Sample], name: str, **where: str) -> float:
    return sum(
        v
        for n, labels, v in samples
        if n == name and all(labels.get(k) == x for k, x in where.items())
    )


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    config = TelemetryConfig(
        enabled=True, traces=False, prometheus_port=0, prometheus_host="127.0.0.1"
    )
    telemetry = setup(config, env={})
    yield telemetry
    telemetry.shutdown()


async def scrape(telemetry: Telemetry) -> tuple[str, list[Sample]]:
    assert telemetry.metrics_url is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(telemetry.metrics_url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text, parse(response.text)


MODELS = {"claude": "claude-opus-4-5-flaky-50", "openai": "gpt-4", "gemini": "gemini-2.0-flash"}
# Half a cent a day: the mix runs the budget down into NearThreshold and beyond.
BUDGET = "[budget]\ndaily_limit_cents = 0.5\n"


async def mixed_run(dep: object, client: object) -> Counter[int]:
    """The mix; returns how many calls were answered with each error status (402, 503 ...)."""
    from vapora.client import Client

    assert isinstance(client, Client)
    kinds = ["CodeGeneration", "GeneralQuery", "Documentation", "CodeReview"]
    refused: Counter[int] = Counter()
    for i in range(24):
        kw: dict[str, object] = {"task_type": kinds[i % 4], "max_tokens": 50, "quality": "High"}
        try:
            if i % 5 == 4:
                async with client.stream(prompt=f"stream {i} about queues", **kw) as s:
                    async for _ in s:
                        pass
            elif i % 7 == 6:
                await client.complete(prompt=f"override {i}", provider="ollama", **kw)
            else:
                await client.complete(prompt=f"request {i} about queues", **kw)
        except VaporaError as error:  # 402s and 503s are part of the mix
            refused[error.status] += 1
    return refused


async def test_a_scrape_after_a_mixed_run_has_the_guides_metrics_agreeing_with_the_ledger(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    config = lambda url: config_text(url, models=MODELS, budget=BUDGET)  # noqa: E731
    async with separate_deployment(tmp_path, config) as dep:
        refused = await mixed_run(dep, dep.client)
        await dep.ledger_caught_up()
        report = await dep.client.report()
        events = [e for _, e, _ in await dep.events()]
        tier_changes = [e for e in events if isinstance(e, BudgetTierChanged)]
        with anyio.fail_after(10):  # the router learns tier changes from its tail
            while True:
                text, samples = await scrape(telemetry)
                seen = total(samples, "vapora_llm_budget_enforcement_total", action="tier_changed")
                if seen >= len(tier_changes):
                    break
                await anyio.sleep(0.05)
        # The keeper's spend gauge follows within a housekeeping tick.
        spent = sum(
            (e.cost_usd for _, e, _ in await dep.events() if isinstance(e, SpendRecorded)),
            Decimal(0),
        )
        with anyio.fail_after(10):
            while total(samples, "vapora_budget_spent_usd", period="day") != float(spent):
                await anyio.sleep(0.05)
                text, samples = await scrape(telemetry)
        # Nothing more arrives once the router has learnt them all: counted once each.
        text, samples = await scrape(telemetry)

    # Every guide metric is there, each sample with exactly the guide's labels.
    names = {n for n, _, _ in samples}
    for name, labels in GUIDE.items():
        assert name in names, name
        for n, got, _ in samples:
            if n == name:
                assert set(got) == labels, (name, got)
    assert "vapora_llm_spend_usd_total" in names and "vapora_budget_tier" in names
    assert "# TYPE vapora_budget_tier gauge\n" in text
    # Spend against the budget as gauges: today's and this month's (all of the run's is today's).
    assert "# TYPE vapora_budget_spent_usd gauge\n" in text
    spent_labels = [labels for n, labels, _ in samples if n == "vapora_budget_spent_usd"]
    assert sorted(labels["period"] for labels in spent_labels) == ["day", "month"]
    assert total(samples, "vapora_budget_spent_usd", period="month") == float(spent) > 0
    assert "# TYPE vapora_llm_spend_usd_total counter\n" in text  # a running total of spend

    # Requests per provider and status = the calls in the log.
    calls: Counter[tuple[str, str]] = Counter()
    for event in events:
        if isinstance(event, CallSucceeded):
            calls[(event.provider, "ok")] += 1
        elif isinstance(event, CallFailed):
            calls[(event.provider, event.error_class)] += 1
    assert calls[("claude", "transient")] > 0, "the mix has no failed call"
    for (provider, status), count in calls.items():
        got = total(samples, "vapora_llm_provider_requests_total", provider=provider, status=status)
        assert got == count, (provider, status)
    assert total(samples, "vapora_llm_provider_requests_total") == sum(calls.values())
    latency = total(samples, "vapora_llm_provider_latency_seconds_count")
    assert latency == sum(calls.values())

    # Spend and tokens per provider = the ledger's report and the log's spend events.
    spend: defaultdict[str, Decimal] = defaultdict(Decimal)
    tokens: Counter[tuple[str, str]] = Counter()
    for event in events:
        if isinstance(event, SpendRecorded):
            spend[event.provider] += event.cost_usd
            tokens[(event.provider, "input")] += event.input_tokens
            tokens[(event.provider, "output")] += event.output_tokens
    assert spend and tokens, "the mix recorded no spend"
    assert {p: v for p, v in report.by_provider.items() if v} == {
        p: v for p, v in spend.items() if v
    }
    assert total(samples, "vapora_llm_spend_usd_total") == pytest.approx(
        float(sum(spend.values())), rel=1e-9, abs=1e-12
    )  # no provider in the metric that the ledger does not have
    assert total(samples, "vapora_llm_provider_tokens_total") == sum(tokens.values())
    for provider, amount in report.by_provider.items():
        got = total(samples, "vapora_llm_spend_usd_total", provider=provider)
        assert got == pytest.approx(float(amount), rel=1e-9, abs=1e-12), provider
    for (provider, kind), count in tokens.items():
        assert total(samples, "vapora_llm_provider_tokens_total", provider=provider, type=kind) == (
            count
        ), (provider, kind)

    # Decisions and fallbacks = the router's events.
    decided = [e for e in events if isinstance(e, RouteDecided)]
    assert total(samples, "vapora_llm_routing_decisions_total") == len(decided)
    assert total(samples, "vapora_llm_routing_decisions_total", reason="override") == 3
    chosen = Counter(
        (e.decision.chain[0] if e.decision.chain else "none", e.task_type.value) for e in decided
    )
    for (selected, task_type), count in chosen.items():
        got = total(
            samples,
            "vapora_llm_routing_decisions_total",
            selected_provider=selected,
            task_type=task_type,
        )
        assert got == count, (selected, task_type)
    reasons = {
        labels["reason"] for n, labels, _ in samples if n == "vapora_llm_routing_decisions_total"
    }
    assert reasons <= {"rules", "budget", "override", "last_resort", "unavailable"}, reasons
    fallbacks = Counter(
        (e.from_provider, e.to_provider or "none")
        for e in events
        if isinstance(e, FallbackTriggered)
    )
    assert fallbacks, "the mix has no fallback"
    for (source, target), count in fallbacks.items():
        got = total(
            samples, "vapora_llm_fallback_triggers_total", from_provider=source, to_provider=target
        )
        assert got == count, (source, target)

    # The budget ran down: tier changes and what the tiers did are counted; the gauge shows it.
    assert tier_changes, "the mix never left the Normal tier"
    last = tier_changes[-1].to_tier.value
    assert total(samples, "vapora_budget_tier") == {"Normal": 0, "NearThreshold": 1}.get(last, 2)
    enforcement = "vapora_llm_budget_enforcement_total"
    for tier, count in Counter(e.to_tier.value for e in tier_changes).items():
        got = total(samples, enforcement, action="tier_changed", tier=tier)
        assert got == count, tier
    assert total(samples, enforcement, action="tier_changed") == len(tier_changes)
    # What each tier made the router do: a decision under NearThreshold prefers the cheapest,
    # under Exceeded takes only free providers; a request nothing admissible could serve is
    # refused with a 402.
    routed = Counter(e.decision.tier.value for e in decided if e.decision.chain)
    assert total(samples, enforcement, action="prefer_cheapest") == routed["NearThreshold"]
    assert total(samples, enforcement, action="zero_cost_only") == routed["Exceeded"]
    assert total(samples, enforcement, action="rejected") == refused[402]
    assert refused[402] + routed["NearThreshold"] + routed["Exceeded"] > 0, refused


async def test_the_endpoint_serves_only_metrics_and_renders_nothing_before_any_metric(
    telemetry: Telemetry,
) -> None:
    assert render(None) == ""
    async with httpx.AsyncClient() as http:
        assert telemetry.metrics_url is not None
        missing = await http.get(telemetry.metrics_url.replace("/metrics", "/other"))
    assert missing.status_code == 404
    _, samples = await scrape(telemetry)
    assert all(not n.startswith("vapora_llm_provider") for n, _, _ in samples)
