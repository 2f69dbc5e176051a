"""The budget keeper counts the same money live as after a restart, and reports the tier it
enforces.

A restart replays the log through the budget views (``vapora/budget_view.py``), which read only
the money fields; the live tail decodes whole events. An event whose money is readable but whose
other fields are not (a task type a newer writer added during a rolling upgrade, a negative token
count, no price) must count on both paths, with the same event time and spend-id dedupe; one
whose money is unusable must count on neither."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.budget_keeper import BudgetKeeper
from actors.connection import Client
from events import subjects
from events.codec import encode
from events.contract import BudgetStatus, Tier
from tests.fault.money import (
    NOON,
    config,
    eventually,
    exact_usage,
    read_log,
    release,
    reserve,
    running,
    runtime,
    spend,
    status,
)
from vapora import audit, budget

pytestmark = pytest.mark.anyio

_SPEND_SUBJECT = subjects.event_subject("spend_recorded", "claude")


def encode_json(stored: dict[str, Any]) -> bytes:
    return msgspec.json.encode(stored)


def _spend_json(cost: str = "0.30", **changes: Any) -> dict[str, Any]:
    """A provider's spend_recorded as stored, with ``changes`` (None: the field left out)."""
    event = spend(task_id=f"T-{uuid.uuid4().hex[:8]}", usage=exact_usage(Decimal(cost)), at=NOON)
    stored: dict[str, Any] = msgspec.json.decode(encode(event))
    for field, value in changes.items():
        if value is None:
            stored.pop(field, None)
        else:
            stored[field] = value
    return stored


async def _store(
    keeper: BudgetKeeper, *events: dict[str, Any], subject: str = _SPEND_SUBJECT
) -> None:
    """Store ``events`` as another writer would, and wait until the keeper has read them."""
    last = 0
    for event in events:
        last = (await keeper.log.js.publish(subject, msgspec.json.encode(event))).seq

    async def read() -> bool:
        return keeper.state.last_sequence >= last

    await eventually(read)


async def _restarted(
    conn: Client, data_dir: Path, daily_cents: int = 100
) -> tuple[BudgetStatus, budget.BudgetState]:
    """What a keeper replaying the whole log (no snapshot) answers."""
    again = BudgetKeeper(runtime(conn, data_dir, cfg=config(daily_cents=daily_cents)))
    async with running(again):
        return await status(conn), again.state


def _money(state: budget.BudgetState) -> tuple[object, ...]:
    return (
        state.total_spent_usd,
        state.spend_events,
        dict(state.days),
        dict(state.months),
        state.watermark,
        state.reserved_usd,
        sorted(state.open_reservations()),
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"task_type": "Translation"},  # a task type a newer writer knows
        {"input_tokens": -1},
        {"price": None},  # no price at all
        {"price": "free"},
        {"model": 7},
    ],
    ids=["new-task-type", "negative-tokens", "no-price", "bad-price", "bad-model"],
)
async def test_a_spend_with_readable_money_counts_live_as_after_a_restart(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture, changes: dict[str, Any]
) -> None:
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    odd = _spend_json(**changes)
    yesterday = _spend_json(cost="0.12", **changes)
    yesterday["at"] = (NOON - timedelta(days=1)).isoformat()
    with caplog.at_level(logging.WARNING, logger="vapora.budget"):
        async with running(keeper):
            await _store(keeper, odd, yesterday, odd)  # the second copy of `odd` counts once
            live, live_state = await status(conn), keeper.state
            said = getattr(keeper, "money_only", None)  # (None before it was counted)
    restarted, restarted_state = await _restarted(conn, tmp_path / "again")

    assert live.spent_today_usd == restarted.spent_today_usd == Decimal("0.30")
    assert live.spent_month_usd == restarted.spent_month_usd == Decimal("0.42")
    assert _money(live_state) == _money(restarted_state)
    assert said == 3
    field = next(iter(changes))
    warnings = [r.getMessage() for r in caplog.records if "not a whole event" in r.getMessage()]
    assert any(odd["id"] in text and field in text for text in warnings), warnings


async def test_a_readable_spend_and_its_unreadable_copy_count_once(
    conn: Client, tmp_path: Path
) -> None:
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    whole = _spend_json()
    copy = {**whole, "task_type": "Translation"}
    async with running(keeper):
        await _store(keeper, copy, whole, copy)
        live = await status(conn)
    restarted, _ = await _restarted(conn, tmp_path / "again")
    assert live.spent_today_usd == restarted.spent_today_usd == Decimal("0.30")


@pytest.mark.parametrize("cost", ["NaN", "-1", "Infinity", "1e16"])
async def test_a_spend_whose_money_is_unusable_counts_on_neither_path(
    conn: Client, tmp_path: Path, cost: str
) -> None:
    """The views read it, the whole decoder does not: the fold passes it by, live and after a
    restart; the reservation it names stays open, and the keeper goes on reading."""
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    async with running(keeper):
        held = await reserve(conn, Decimal("0.10"))
        assert held.admitted
        bad = _spend_json(
            cost_usd=cost, reservation_id=held.reservation_id, task_type="Translation"
        )
        await _store(keeper, bad, _spend_json(cost="0.21"))
        live, live_state = await status(conn), keeper.state
    restarted, restarted_state = await _restarted(conn, tmp_path / "again")
    assert live.spent_today_usd == restarted.spent_today_usd == Decimal("0.21")
    assert live.reserved_usd == restarted.reserved_usd == Decimal("0.10")
    assert _money(live_state) == _money(restarted_state)


async def test_a_stranger_on_the_budget_subject_does_not_stop_a_restart(
    conn: Client, tmp_path: Path
) -> None:
    """A message on the budget subject of another event type, unreadable whole: passed by live
    and by the replay (whose view of it is empty), the fence moved past it."""
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    stranger = {"type": "route_decided", "id": "stranger", "at": NOON.isoformat()}
    budget_subject = subjects.event_subject("budget_reserved")
    async with running(keeper):
        await _store(keeper, stranger, subject=budget_subject)
        assert keeper.fenced_out is None
        assert (await reserve(conn, Decimal("0.10"))).admitted
    restarted, _ = await _restarted(conn, tmp_path / "again")
    assert restarted.reserved_usd == Decimal("0.10")


async def test_the_status_reports_the_tier_enforced_and_the_audit_agrees(
    conn: Client, tmp_path: Path
) -> None:
    """After Exceeded the keeper refuses paid reservations until the percentage is 5 points
    below the warn threshold: at 88 % its status says Exceeded (a starting router loads it), as
    the fold of the log (the audit, ``vapora budget`` offline) and a restarted keeper say."""
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    async with running(keeper):
        assert (await reserve(conn, Decimal("0.88"))).admitted
        extra = await reserve(conn, Decimal("0.04"))
        assert extra.admitted and extra.tier is Tier.EXCEEDED
        assert (await release(conn, extra.reservation_id)).status is None
        live = await status(conn)
        refused = await reserve(conn, Decimal("0.01"))
        entries = [(e.event, e.seq) for e in await read_log(keeper.log)]
    assert live.daily_percent == pytest.approx(88)
    assert not refused.admitted and refused.tier is Tier.EXCEEDED
    assert live.tier is Tier.EXCEEDED
    limits = budget.BudgetLimits.from_cents(daily_cents=100)
    assert audit.check_budget(entries, live, limits) == []
    folded = budget.catch_up(budget.EMPTY, entries)
    assert budget.status(folded, limits, live.at).tier is Tier.EXCEEDED
    restarted, _ = await _restarted(conn, tmp_path / "again")
    assert restarted.tier is Tier.EXCEEDED


@pytest.mark.parametrize("shape", ["empty", "two-events"])
async def test_a_stored_message_that_is_not_one_event_stops_no_reader(
    conn: Client, tmp_path: Path, shape: str
) -> None:
    """An empty message made the batch one event short, two objects in one one event long: the
    reader's sequences and events no longer paired, and it retried that position for good
    (every later spend uncounted; a restart failed)."""
    first, second = _spend_json(cost="0.06"), _spend_json(cost="0.09")
    payload = b"" if shape == "empty" else encode_json(first) + b"," + encode_json(second)
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    async with running(keeper):
        await keeper.log.js.publish(_SPEND_SUBJECT, payload)
        await _store(keeper, _spend_json(cost="0.30"))
        live = await status(conn)
    restarted, _ = await _restarted(conn, tmp_path / "again")
    assert live.spent_today_usd == restarted.spent_today_usd == Decimal("0.30")


async def test_a_message_that_cannot_be_read_again_is_passed_by_not_waited_on(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading an unreadable spend again failing each time (a slow or refused JetStream API)
    held the tail at it for good: every later spend went uncounted, and once holds expired the
    keeper admitted past the limit."""
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    async with running(keeper):

        async def failing(*args: object, **kwargs: object) -> None:
            raise TimeoutError("the JetStream API did not answer")

        keeper.log.js.get_msg = failing  # type: ignore[method-assign,assignment]
        keeper.resync_timeout_s = 0.2
        with caplog.at_level(logging.ERROR, logger="vapora.budget"):
            await _store(keeper, _spend_json(cost="0.12", task_type="Translation"), _spend_json())
            live = await status(conn)
    assert live.spent_today_usd == Decimal("0.30")  # the whole spend after it counts
    assert any("could not be read again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("at", ["9999-12-31T23:30:00-01:00", "0001-01-01T00:30:00+01:00"])
async def test_an_event_time_outside_the_utc_years_is_unreadable_not_a_stall(
    conn: Client, tmp_path: Path, at: str
) -> None:
    """Valid ISO 8601, but past the year 9999 (or before the year 1) once in UTC: it decoded,
    and every reader that put it in UTC failed with an OverflowError. The keeper's tail
    retried it for good (spend after it uncounted: $15 past a $10 limit admitted in a review),
    no keeper could start again, and the audit crashed. It is unreadable, as any event that
    is not one: passed by live and on a restart, and named by the audit."""
    keeper = BudgetKeeper(runtime(conn, tmp_path / "live", cfg=config(daily_cents=100)))
    async with running(keeper):
        await _store(keeper, _spend_json(cost="0.12", at=at), _spend_json(cost="0.30"))
        live = await status(conn)
        entries = [(e.event, e.seq) for e in await read_log(keeper.log)]
    restarted, _ = await _restarted(conn, tmp_path / "again")
    assert live.spent_today_usd == restarted.spent_today_usd == Decimal("0.30")
    limits = budget.BudgetLimits.from_cents(daily_cents=100)
    assert audit.check_budget(entries, live, limits) == []
