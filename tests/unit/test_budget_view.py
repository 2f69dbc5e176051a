"""The budget fold's views of events: they hold the same values as the events, cover every event
type of the contract, and folding them gives the very state that folding the events gives."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import DecodeError, decode_event, encode, event_tag
from events.contract import Price, TaskType
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    Event,
    SpendRecorded,
)
from tests.samples import EVENTS
from vapora import budget
from vapora.budget_view import View, decode_views

GOLDEN = Path(__file__).parents[1] / "golden" / "events"
T0 = datetime(2026, 1, 31, 20, 0, tzinfo=UTC)  # the run crosses midnight and the month's end
PRICE = Price(
    input_per_mtok=Decimal(3),
    output_per_mtok=Decimal(15),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
    source="test",
    version="1",
)


def batch(events: list[Event]) -> bytes:
    return b"[" + b",".join(encode(event) for event in events) + b"]"


def test_every_event_type_of_the_contract_has_a_view_of_its_tag() -> None:
    payloads = sorted(GOLDEN.glob("*.json"))
    assert {p.stem for p in payloads} == {t.__struct_config__.tag for t in get_args(Event)}
    events = [decode_event(p.read_bytes()) for p in payloads]
    views = decode_views(batch(events))
    assert [event_tag(v) for v in views] == [event_tag(e) for e in events]


def test_a_view_holds_exactly_the_events_values_for_the_fields_it_reads() -> None:
    events = [decode_event(p.read_bytes()) for p in sorted(GOLDEN.glob("*.json"))]
    for event, view in zip(events, decode_views(batch(events)), strict=True):
        for field in view.__struct_fields__:
            assert getattr(view, field) == getattr(event, field), (event_tag(event), field)
            assert type(getattr(view, field)) is type(getattr(event, field))


def test_a_broken_stored_event_is_a_decode_error_naming_the_field() -> None:
    good = encode(SpendRecordedFactory.make(0, T0))
    broken = good.replace(b'"cost_usd":"', b'"cost_usd":"not money')
    with pytest.raises(DecodeError, match="cost_usd"):
        decode_views(b"[" + good + b"," + broken + b"]")
    with pytest.raises(DecodeError, match="type"):
        decode_views(b'[{"type": "no_such_event", "id": "x"}]')


class SpendRecordedFactory:
    @staticmethod
    def make(i: int, at: datetime, rid: str | None = None, cost: str = "0.125") -> SpendRecorded:
        return SpendRecorded(
            id=f"s{i}",
            at=at,
            task_id=f"t{i % 5}",
            task_type=TaskType.CODE_GENERATION,
            provider="claude",
            model="claude-sonnet",
            input_tokens=100 + i,
            output_tokens=10,
            cost_usd=Decimal(cost),
            price=PRICE,
            reservation_id=rid,
        )


# One step of a run: a reserved call settled, failed or left open; a lease granted, extended,
# spent against and returned.
step = st.tuples(
    st.sampled_from(["settled", "failed", "open", "lease"]),
    st.integers(0, 600),  # minutes after T0
    st.integers(1, 900).map(lambda c: Decimal(c) / 1000),
)


def run_of(steps: list[tuple[str, int, Decimal]]) -> list[Event]:
    out: list[Event] = []
    ids = itertools.count()
    for i, (kind, minute, cost) in enumerate(steps):
        at, rid, task = T0 + timedelta(minutes=minute), f"r{i}", f"t{i % 4}"
        if kind == "lease":
            lid = f"lease-{i}"
            for version, granted in ((1, "0.5"), (2, "1.5")):
                out.append(
                    BudgetLeased(
                        id=f"e{next(ids)}",
                        at=at,
                        lease_id=lid,
                        holder="router-a",
                        granted_usd=Decimal(granted),
                        expires_at=at + timedelta(minutes=5),
                        version=version,
                    )
                )
            out.append(SpendRecordedFactory.make(next(ids), at, lid, str(cost)))
            out.append(
                BudgetLeaseReturned(
                    id=f"e{next(ids)}",
                    at=at + timedelta(seconds=3),
                    lease_id=lid,
                    holder="router-a",
                    kept_usd=cost,
                    reason="returned",
                    version=3,
                )
            )
            continue
        out.append(
            BudgetReserved(
                id=f"e{next(ids)}",
                at=at,
                task_id=task,
                reservation_id=rid,
                provider="claude",
                amount_usd=Decimal("1"),
                expires_at=at + timedelta(minutes=2),
                task_limit_usd=Decimal("5") if i % 3 == 0 else None,
            )
        )
        if kind != "open":
            spend_at = at + timedelta(seconds=1)
            out.append(SpendRecordedFactory.make(next(ids), spend_at, rid, str(cost)))
        if kind == "failed":
            out.append(
                BudgetReleased(
                    id=f"e{next(ids)}",
                    at=at + timedelta(seconds=2),
                    task_id=task,
                    reservation_id=rid,
                    reason="failed",
                )
            )
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(step, max_size=30), st.randoms(use_true_random=False))
def test_folding_the_views_gives_the_state_folding_the_events_gives(steps, rng) -> None:
    events = run_of(steps)
    rng.shuffle(events)  # any order the log may hold them in
    pairs = list(zip(events, itertools.count(1), strict=False))
    views: list[View] = decode_views(batch(events)) if events else []
    from_events = budget.catch_up(budget.EMPTY, pairs)
    from_views = budget.Fold()
    from_views.apply((view, seq) for view, (_, seq) in zip(views, pairs, strict=True))  # type: ignore[misc]
    assert from_views.state() == from_events
    assert budget.snapshot(from_views.state()) == budget.snapshot(from_events)


def test_a_live_view_reads_the_fold_in_place_and_a_frozen_state_never_changes() -> None:
    """The live keeper reads its state after every event: a view copies nothing (a frozen state
    made every next write copy a 64th of the map written: O(n) per event at scale)."""
    fold = budget.Fold()
    at = T0
    fold.apply_event(SpendRecordedFactory.make(1, at, cost="0.5"))
    frozen = fold.state()
    view = fold.view()
    index = hash("t1") & (len(view._tasks) - 1)
    fold.apply_event(SpendRecordedFactory.make(6, at, cost="0.25"))  # task t1 again
    after = fold.view()
    assert frozen.total_spent_usd == Decimal("0.5")  # the frozen state is a value
    assert frozen.task("t1").spent_usd == Decimal("0.5")
    assert after.total_spent_usd == Decimal("0.75")
    assert after.task("t1").spent_usd == Decimal("0.75")
    # The write after the freeze copied the shard once; writes after a view do not copy it.
    assert after._tasks[index] is not frozen._tasks[index]
    fold.apply_event(SpendRecordedFactory.make(11, at, cost="0.25"))
    assert fold.view()._tasks[index] is after._tasks[index]
    assert fold.view().task("t1").spent_usd == Decimal("1.00")
    assert view.total_spent_usd == Decimal("0.5")  # a view's own fields are as of its making


@settings(max_examples=40, deadline=None)
@given(st.lists(step, min_size=1, max_size=20), st.integers(0, 30))
def test_a_batch_folded_as_read_equals_the_fold_of_its_pairs(steps, overlap) -> None:
    """``apply_sequenced`` (a replay batch, the keeper's restart) skips what was applied and
    gives the state ``catch_up`` gives, for a batch wholly new or overlapping what was folded."""
    events = run_of(steps)
    views: list[View] = decode_views(batch(events))
    seqs = range(1, len(events) + 1)
    expected = budget.catch_up(budget.EMPTY, list(zip(events, seqs, strict=True)))
    split = max(0, len(events) - overlap)
    fold = budget.Fold()
    fold.apply_sequenced(seqs[:split], views[:split])
    fold.apply_sequenced(seqs[split // 2 :], views[split // 2 :])  # overlaps the first part
    assert fold.state() == expected
    assert fold.last_sequence == len(events)


@pytest.mark.parametrize("amount", ["NaN", "sNaN", "Infinity", "-Infinity", "-0.01", "1E+1000000"])
@pytest.mark.parametrize(
    ("tag", "field"),
    [
        ("spend_recorded", "cost_usd"),
        ("budget_reserved", "amount_usd"),
        ("budget_reserved", "task_limit_usd"),
        ("budget_leased", "granted_usd"),
        ("budget_lease_returned", "kept_usd"),
    ],
)
def test_a_stored_event_with_an_amount_no_sum_can_take_is_unreadable_naming_it(
    tag: str, field: str, amount: str
) -> None:
    """A NaN stored as a spend stopped the keeper for good (its tier comparison raised), and a
    negative or infinite one lowered the spend every limit counts: such an event does not decode
    as an event (every reader passes it by as unreadable), and the budget fold passes its view
    by the same way."""
    sample = EVENTS[tag]
    document = msgspec.json.decode(encode(sample))
    document[field] = amount
    data = msgspec.json.encode(document)
    with pytest.raises(DecodeError, match=f"`{field}` must be a finite, non-negative decimal"):
        decode_event(data)
    # The replay's views do not check (a fifth of their decoding): the fold passes them by.
    [view] = decode_views(b"[" + data + b"]")
    before = budget.catch_up(budget.EMPTY, [(EVENTS["budget_reserved"], 1)])
    after = budget.catch_up(before, [(view, 2)])
    assert after.last_sequence == 2
    kept = ("total_spent_usd", "reserved_usd", "leased_usd", "watermark", "days", "months")
    assert [getattr(after, k) for k in kept] == [getattr(before, k) for k in kept]
    assert after.tasks() == before.tasks()
    assert after.open_reservations() == before.open_reservations()
    assert after.leases == before.leases
