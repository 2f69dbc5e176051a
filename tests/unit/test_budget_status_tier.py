"""``budget.status`` reports the tier the keeper enforces: the last tier announced in the log
(``budget_tier_changed``, folded into ``state.announced``), settled with the 5-point margin,
not the raw tier of the percentage. What ``vapora budget`` (offline: a fold of the log) and a
starting router read must be what the keeper does."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from events.codec import encode
from events.contract import Price, TaskType, Tier
from events.log import BudgetTierChanged, Event, SpendRecorded
from vapora import budget
from vapora.budget_view import decode_views

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)
LIMITS = budget.BudgetLimits.from_cents(daily_cents=100)  # $1: a cent is a point
PRICE = Price(
    input_per_mtok=Decimal(1),
    output_per_mtok=Decimal(1),
    cache_read_per_mtok=Decimal(1),
    cache_write_per_mtok=Decimal(1),
    source="test",
    version="1",
)
_ids = itertools.count()


def spent(cost: str, at: datetime = NOW) -> SpendRecorded:
    return SpendRecorded(
        id=f"s-{next(_ids)}",
        at=at,
        task_id="t",
        task_type=TaskType.GENERAL_QUERY,
        provider="claude",
        model="m",
        input_tokens=0,
        output_tokens=0,
        cost_usd=Decimal(cost),
        price=PRICE,
    )


def announced(tier: Tier, at: datetime = NOW) -> BudgetTierChanged:
    return BudgetTierChanged(
        id=f"t-{next(_ids)}",
        at=at,
        from_tier=Tier.NORMAL,
        to_tier=tier,
        daily_percent=0.0,
        monthly_percent=0.0,
    )


def test_after_exceeded_the_status_stays_exceeded_until_5_points_below_the_threshold() -> None:
    state = budget.replay([announced(Tier.EXCEEDED), spent("0.88")])
    assert budget.status(state, LIMITS, NOW).tier is Tier.EXCEEDED
    assert budget.settle_tier(Tier.EXCEEDED, state, LIMITS, NOW) is Tier.EXCEEDED
    # The next UTC day empties the window: the keeper announces Normal, and so does the status.
    assert budget.status(state, LIMITS, NOW + timedelta(days=1)).tier is Tier.NORMAL


def test_the_status_falls_from_near_threshold_only_with_the_margin() -> None:
    state = budget.replay([announced(Tier.NEAR_THRESHOLD), spent("0.46")])
    assert budget.status(state, LIMITS, NOW).tier is Tier.NEAR_THRESHOLD
    state = budget.replay([announced(Tier.NEAR_THRESHOLD), spent("0.44")])
    assert budget.status(state, LIMITS, NOW).tier is Tier.NORMAL


def test_a_rise_is_reported_at_once_before_it_is_announced() -> None:
    state = budget.replay([announced(Tier.NORMAL), spent("0.95")])
    assert budget.status(state, LIMITS, NOW).tier is Tier.EXCEEDED


def test_the_last_tier_announced_counts_and_moves_nothing_else() -> None:
    money = [spent("0.30"), spent("0.20", NOW + timedelta(hours=1))]
    plain = budget.replay(money)
    tiers = [announced(Tier.NEAR_THRESHOLD), announced(Tier.EXCEEDED, NOW + timedelta(days=9))]
    state = budget.replay([money[0], *tiers, money[1]])
    assert state.announced is Tier.EXCEEDED
    assert state.watermark == plain.watermark and state.days == plain.days
    assert budget.evolve(plain, announced(Tier.NEAR_THRESHOLD)).announced is Tier.NEAR_THRESHOLD
    assert budget.restore(budget.snapshot(state)) == state


@given(
    steps=st.lists(
        st.one_of(
            st.integers(0, 40).map(lambda cents: spent(str(Decimal(cents) / 100))),
            st.sampled_from(list(Tier)).map(announced),
        ),
        max_size=12,
    )
)
def test_a_fold_of_views_reports_the_status_of_a_fold_of_events(steps: list[Event]) -> None:
    """The keeper's replay (views) and the audit's or the CLI's fold (whole events) report one
    status, tier included; each is the tier settled from the last one announced."""
    views = decode_views(b"[" + b",".join(encode(event) for event in steps) + b"]")
    fold = budget.Fold()
    fold.apply(zip(views, itertools.count(1)))
    whole = budget.catch_up(budget.EMPTY, zip(steps, itertools.count(1)))
    assert budget.status(fold.state(), LIMITS, NOW) == budget.status(whole, LIMITS, NOW)
    last = next((e.to_tier for e in reversed(steps) if isinstance(e, BudgetTierChanged)), None)
    expected = budget.settle_tier(last or Tier.NORMAL, whole, LIMITS, NOW)
    assert budget.status(whole, LIMITS, NOW).tier is expected
