"""One realistic sample of every event type and public message, shared by the contract tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from events import (
    BudgetReleased,
    BudgetReserved,
    BudgetTierChanged,
    CallFailed,
    CallSucceeded,
    Candidate,
    FallbackTriggered,
    FilterVerdict,
    Price,
    ProviderHealthChanged,
    Quality,
    RouteDecided,
    RouteDecision,
    SpendRecorded,
    TaskType,
    Tier,
    Usage,
)
from events.log import BudgetLeased, BudgetLeaseReturned

AT = datetime(2026, 3, 31, 23, 59, 58, 123456, tzinfo=UTC)

PRICE = Price(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.30"),
    cache_write_per_mtok=Decimal("3.75"),
    source="genai-prices",
    version="0.2.3",
)

DECISION = RouteDecision(
    reason="claude scored highest (0.87) among 3 kept candidates",
    chain=["claude", "openai", "gemini"],
    candidates=[
        Candidate(
            provider="claude",
            model="claude-opus-4-5",
            verdicts=[FilterVerdict(filter="availability", passed=True, reason="ok")],
            score=0.87,
            estimated_cost_usd=Decimal("0.0321"),
            kept=True,
        ),
        Candidate(
            provider="ollama",
            model="llama2",
            verdicts=[
                FilterVerdict(filter="availability", passed=False, reason="health check failed")
            ],
            kept=False,
        ),
    ],
    tier=Tier.NORMAL,
)

USAGE = Usage(input_tokens=1200, output_tokens=350, cache_read_tokens=1000, cache_write_tokens=0)

EVENTS = {
    "route_decided": RouteDecided(
        id="ev-route-1",
        at=AT,
        task_id="task-1",
        task_type=TaskType.CODE_GENERATION,
        quality=Quality.HIGH,
        decision=DECISION,
    ),
    "call_succeeded": CallSucceeded(
        id="ev-call-1",
        at=AT,
        task_id="task-1",
        provider="claude",
        model="claude-opus-4-5",
        attempt=1,
        usage=USAGE,
        cost_usd=Decimal("0.006150"),
        latency_ms=812.5,
        first_token_ms=203.25,
        finish_reason="end_turn",
        causation_id="ev-route-1",
    ),
    "call_failed": CallFailed(
        id="ev-fail-1",
        at=AT,
        task_id="task-2",
        provider="claude",
        model="claude-opus-4-5",
        attempt=1,
        error_code="overloaded_error",
        error_class="transient",
        message="Overloaded",
        status=529,
        latency_ms=41.0,
    ),
    "fallback_triggered": FallbackTriggered(
        id="ev-fb-1",
        at=AT,
        task_id="task-2",
        from_provider="claude",
        to_provider="openai",
        reason="transient: 529 overloaded_error",
        attempt=1,
        causation_id="ev-fail-1",
    ),
    "budget_reserved": BudgetReserved(
        id="ev-res-1",
        at=AT,
        task_id="task-1",
        reservation_id="res-1",
        provider="claude",
        amount_usd=Decimal("0.0321"),
        expires_at=datetime(2026, 4, 1, 0, 1, 58, tzinfo=UTC),
        task_limit_usd=Decimal("5.00"),
    ),
    "spend_recorded": SpendRecorded(
        id="ev-spend-1",
        at=AT,
        task_id="task-1",
        task_type=TaskType.CODE_GENERATION,
        provider="claude",
        model="claude-opus-4-5",
        input_tokens=1200,
        output_tokens=350,
        cache_read_tokens=1000,
        cost_usd=Decimal("0.006150"),
        price=PRICE,
        reservation_id="res-1",
        causation_id="ev-call-1",
    ),
    "budget_released": BudgetReleased(
        id="ev-rel-1",
        at=AT,
        task_id="task-2",
        reservation_id="res-2",
        reason="failed",
    ),
    "budget_leased": BudgetLeased(
        id="ev-lease-1",
        at=AT,
        lease_id="lease-1",
        holder="router-7f3a",
        granted_usd=Decimal("1.250000"),
        expires_at=datetime(2026, 4, 1, 0, 4, 58, 123456, tzinfo=UTC),
        version=2,
    ),
    "budget_lease_returned": BudgetLeaseReturned(
        id="ev-lease-ret-1",
        at=AT,
        lease_id="lease-1",
        holder="router-7f3a",
        kept_usd=Decimal("0.412300"),
        reason="returned",
        version=3,
    ),
    "budget_tier_changed": BudgetTierChanged(
        id="ev-tier-1",
        at=AT,
        from_tier=Tier.NORMAL,
        to_tier=Tier.NEAR_THRESHOLD,
        daily_percent=51.25,
        monthly_percent=4.5,
        causation_id="ev-res-1",
    ),
    "provider_health_changed": ProviderHealthChanged(
        id="ev-health-1",
        at=AT,
        provider="claude",
        available=False,
        reason="rate limited: retry-after 30 s",
        breaker="closed",
        rate_limited_until=datetime(2026, 4, 1, 0, 0, 28, tzinfo=UTC),
        latency_estimate_ms=780.0,
        instance="7d0c3f9ab1e24c55",
    ),
}
