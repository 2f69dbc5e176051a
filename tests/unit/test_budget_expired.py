"""`budget.without_expired`, what `vapora budget --data-dir` reports: a stopped deployment's
log holds the holds that were open when it stopped, expired since; the keeper's tick would
have closed them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from events.log import BudgetLeased, BudgetReserved
from vapora import budget

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
LIMITS = budget.BudgetLimits.from_cents(
    daily_cents=Decimal(1000), monthly_cents=None, per_task_cents=None, warn_threshold_percent=90
)


def test_holds_that_expired_since_the_deployment_stopped_are_not_counted() -> None:
    state = budget.catch_up(
        budget.EMPTY,
        [
            (
                BudgetReserved(
                    id="r",
                    at=T0,
                    task_id="t",
                    reservation_id="res-1",
                    provider="openai",
                    amount_usd=Decimal("1.50"),
                    expires_at=T0 + timedelta(seconds=120),
                ),
                1,
            ),
            (
                BudgetLeased(
                    id="l",
                    at=T0,
                    lease_id="lease-1",
                    holder="router-x",
                    granted_usd=Decimal("2.00"),
                    expires_at=T0 + timedelta(seconds=300),
                ),
                2,
            ),
        ],
    )
    before = budget.status(state, LIMITS, T0 + timedelta(seconds=60))
    assert (before.reserved_usd, before.leased_usd) == (Decimal("1.50"), Decimal("2.00"))
    later = T0 + timedelta(hours=2)
    after = budget.status(budget.without_expired(state, later), LIMITS, later)
    assert (after.reserved_usd, after.leased_usd, after.open_leases) == (0, 0, 0)
    assert (
        budget.without_expired(state, T0 + timedelta(seconds=60)).reservation("res-1") is not None
    )
