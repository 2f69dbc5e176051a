"""Budget leases in the fold: granting, spending down, returning, expiring, and the property that
spend never exceeds a limit however leases, local admissions and reservations interleave."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.contract import BudgetLeaseRequest, BudgetReserve, Price, TaskType, Tier
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    Event,
    SpendRecorded,
)
from vapora import budget
from vapora.budget import EMPTY, BudgetLimits, BudgetState, evolve, lease_size

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
PRICE = Price(
    input_per_mtok=Decimal(3),
    output_per_mtok=Decimal(15),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
    source="test",
    version="1",
)
_ids = itertools.count()


def leased(
    lid: str, granted: str, version: int = 1, at: datetime = T0, holder: str = "router-a"
) -> BudgetLeased:
    return BudgetLeased(
        id=f"ev-{next(_ids)}",
        at=at,
        lease_id=lid,
        holder=holder,
        granted_usd=Decimal(granted),
        expires_at=at + timedelta(minutes=5),
        version=version,
    )


def returned(
    lid: str, kept: str, version: int, at: datetime = T0, reason: str = "returned"
) -> BudgetLeaseReturned:
    return BudgetLeaseReturned(
        id=f"ev-{next(_ids)}",
        at=at,
        lease_id=lid,
        holder="router-a",
        kept_usd=Decimal(kept),
        reason=reason,  # type: ignore[arg-type]
        version=version,
    )


def spent(cost: str, rid: str | None, at: datetime = T0, task: str = "task-1") -> SpendRecorded:
    return SpendRecorded(
        id=f"ev-{next(_ids)}",
        at=at,
        task_id=task,
        task_type=TaskType.GENERAL_QUERY,
        provider="claude",
        model="claude-sonnet",
        input_tokens=100,
        output_tokens=10,
        cost_usd=Decimal(cost),
        price=PRICE,
        reservation_id=rid,
    )


def fold(*events: Event) -> BudgetState:
    state = EMPTY
    for event in events:
        state = evolve(state, event)
    return state


def ask(lid: str, holder: str = "router-a", min_usd: str = "0") -> BudgetLeaseRequest:
    return BudgetLeaseRequest(lease_id=lid, holder=holder, min_usd=Decimal(min_usd))


LIMITS = BudgetLimits(daily_usd=Decimal(10), monthly_usd=Decimal(100))


# --- the fold -----------------------------------------------------------------------------------


def test_a_lease_commits_its_amount_and_spend_against_it_moves_money_from_committed_to_spent():
    state = fold(leased("L1", "2"), spent("0.5", "L1"), spent("0.25", "L1"))
    assert state.leased_usd == Decimal("1.25")
    assert state.spent_on(T0.date()) == Decimal("0.75")
    assert state.spent_on(T0.date()) + state.committed_usd == Decimal(2)  # never counted twice
    assert budget.status(state, LIMITS, T0).leased_usd == Decimal("1.25")
    assert budget.status(state, LIMITS, T0).open_leases == 1


def test_an_extension_raises_the_total_and_an_older_or_repeated_version_changes_nothing():
    first, second = leased("L1", "2", version=1), leased("L1", "3", version=2)
    state = fold(first, spent("1", "L1"), second, first, second)
    assert state.leased_usd == Decimal(2)
    lease = state.lease("L1")
    assert lease is not None and lease.granted_usd == Decimal(3) and lease.version == 2


def test_returning_keeps_what_is_in_flight_until_it_is_spent_or_the_lease_expires():
    state = fold(leased("L1", "2"), spent("0.5", "L1"), returned("L1", "0.8", version=2))
    assert state.leased_usd == Decimal("0.3")  # the attempt still in flight
    assert budget.lease_size(state, LIMITS, ask("L1"), T0, Decimal(1))[0] == 0  # no reuse
    state = evolve(state, spent("0.1", "L1"))
    assert state.leased_usd == Decimal("0.2") and state.spent_on(T0.date()) == Decimal("0.6")
    state = evolve(state, returned("L1", "0.6", version=3, reason="expired"))
    assert state.leased_usd == 0 and state.lease("L1") is None and state.is_closed("L1")
    state = evolve(state, leased("L1", "5", version=4))  # a closed lease never reopens
    assert state.leased_usd == 0 and state.lease("L1") is None


def test_a_return_with_nothing_left_closes_the_lease_and_a_late_spend_still_counts_once():
    state = fold(leased("L1", "2"), returned("L1", "0", version=2))
    assert state.lease("L1") is None and state.leased_usd == 0
    late = spent("0.3", "L1")
    state = fold(leased("L1", "2"), returned("L1", "0", version=2), late, late)
    assert state.total_spent_usd == Decimal("0.3") and state.leased_usd == 0


def test_leases_count_towards_the_tier_and_against_reservations():
    state = fold(spent("4", None), leased("L1", "1.5"))
    assert budget.tier(state, LIMITS, T0) is Tier.NEAR_THRESHOLD  # (4 + 1.5) / 10
    reserve = BudgetReserve(
        reservation_id="r1", task_id="t", provider="claude", amount_usd=Decimal("4.6")
    )
    refusal = budget.admit(state, LIMITS, reserve, T0)
    assert not refusal.admitted and "held $1.5" in refusal.reason


def test_lease_size_is_a_share_of_the_headroom_to_the_next_boundary_split_among_holders():
    size, _ = lease_size(EMPTY, LIMITS, ask("L1"), T0, Decimal(100))
    assert size == Decimal("2.5")  # half of the $5 up to 50 % of the daily $10
    state = fold(leased("L1", "2.5"))
    size, _ = lease_size(state, LIMITS, ask("L2", holder="router-b"), T0, Decimal(100))
    assert size == Decimal("0.625")  # half of the $2.50 left, split between two holders
    size, why = lease_size(EMPTY, LIMITS, ask("L1"), T0, Decimal("0.4"))
    assert size == Decimal("0.4") and "lease size" in why  # the configured cap


def test_an_extension_never_lets_one_lease_outstanding_exceed_the_configured_size():
    state = fold(leased("L1", "0.3"))
    size, _ = lease_size(state, LIMITS, ask("L1"), T0, Decimal("0.4"))
    assert size == Decimal("0.1")


def test_near_the_limit_and_when_exceeded_leases_shrink_to_nothing():
    near = fold(spent("8.99", None))  # the warn line is $9: 1 cent of headroom
    size, why = lease_size(near, LIMITS, ask("L1", min_usd="0.01"), T0, Decimal(1))
    assert size == 0 and "no lease" in why
    over = fold(spent("9.5", None))
    assert lease_size(over, LIMITS, ask("L1"), T0, Decimal(1))[0] == 0
    zero = BudgetLimits(daily_usd=Decimal(0))
    assert lease_size(EMPTY, zero, ask("L1"), T0, Decimal(1))[0] == 0


def test_a_lease_of_another_holder_or_a_closed_one_is_not_extended():
    state = fold(leased("L1", "1"), leased("L2", "1"), returned("L2", "0", version=2))
    assert lease_size(state, LIMITS, ask("L1", holder="router-b"), T0, Decimal(1))[0] == 0
    assert lease_size(state, LIMITS, ask("L2"), T0, Decimal(1))[0] == 0


def test_expired_leases_oldest_first_and_a_snapshot_keeps_them():
    a = leased("La", "1", at=T0 + timedelta(minutes=1))
    b = leased("Lb", "1", at=T0)
    state = fold(a, b, spent("0.2", "La"))
    assert budget.expired_leases(state, T0 + timedelta(minutes=5)) == ["Lb"]
    assert budget.expired_leases(state, T0 + timedelta(minutes=9)) == ["Lb", "La"]
    assert budget.restore(budget.snapshot(state)) == state


# --- the property -------------------------------------------------------------------------------

PROP_LIMITS = BudgetLimits(daily_usd=Decimal(1), monthly_usd=Decimal(2), per_task_usd=Decimal(2))
LEASE_MAX = Decimal(1)
cents = st.integers(min_value=0, max_value=60).map(lambda c: Decimal(c) / 100)
lease_ops = st.one_of(
    st.tuples(st.just("lease"), st.integers(0, 2), st.just(Decimal(0))),  # holder asks/extends
    st.tuples(st.just("take"), st.integers(0, 2), cents),  # holder admits an attempt locally
    st.tuples(st.just("finish"), st.integers(0, 30), st.integers(0, 100)),  # % of upper bound
)
op = st.one_of(
    lease_ops,
    lease_ops,
    st.tuples(st.just("return"), st.integers(0, 2), st.just(Decimal(0))),
    st.tuples(st.just("reserve"), st.integers(0, 5), cents),
    st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 100)),
    st.tuples(st.just("expire"), st.integers(0, 15), st.just(Decimal(0))),  # minutes to advance
)


@dataclass
class _Holder:
    """A router's local view of its lease: what it may admit without asking the keeper."""

    lease_id: str | None = None
    granted: Decimal = Decimal(0)
    committed: Decimal = Decimal(0)  # spent plus upper bounds in flight
    version: int = 0


@dataclass
class _World:
    now: datetime
    holders: list[_Holder] = field(default_factory=lambda: [_Holder() for _ in range(3)])
    in_flight: list[tuple[int, str, Decimal]] = field(default_factory=list)  # holder, lease, ub
    leases: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # granted, spent
    n: int = 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=100), st.integers(0, 23))
def test_leases_spend_and_reservations_interleaved_never_let_spend_exceed_a_limit(ops, hour):
    world = _World(now=datetime(2026, 1, 31, hour, tzinfo=UTC))  # crosses midnight, month end
    state, log, seq = EMPTY, [], 0
    for kind, a, b in ops:
        world.n += 1
        for event in _step(world, state, kind, a, b):
            seq += 1
            state = evolve(state, event, seq)
            log.append((event, seq))
            _model(world, event)
        _assert_within_limits(state, world.now)
        expected = sum((max(g - s, Decimal(0)) for g, s in world.leases.values()), Decimal(0))
        assert state.leased_usd == expected
    for holder, lid, upper in list(world.in_flight):  # every attempt ends, at its upper bound
        seq += 1
        event = spent(str(upper), lid, at=world.now, task=f"h{holder}")
        state = evolve(state, event, seq)
        log.append((event, seq))
        _assert_within_limits(state, world.now)
    assert budget.catch_up(EMPTY, log) == state
    replayed = budget.replay(event for event, _ in log)
    assert _totals(replayed) == _totals(budget.catch_up(EMPTY, log))
    # The keeper folds its own events once at append time and once more from the tail.
    twice = budget.catch_up(budget.replay(event for event, _ in log), log)
    assert _totals(twice) == _totals(replayed)
    assert budget.restore(budget.snapshot(replayed)) == replayed


def _step(world: _World, state: BudgetState, kind: str, a: int, b: object) -> list[Event]:
    now, n = world.now, world.n
    if kind == "lease":
        return _lease(world, state, a)
    if kind == "take":
        holder, amount = world.holders[a], b
        assert isinstance(amount, Decimal)
        if holder.lease_id is not None and holder.committed + amount <= holder.granted:
            holder.committed += amount
            world.in_flight.append((a, holder.lease_id, amount))
        return []
    if kind == "finish":
        if not world.in_flight:
            return []
        index, lid, upper = world.in_flight.pop(a % len(world.in_flight))
        cost = (upper * int(b) / 100).quantize(Decimal("0.0001"))  # type: ignore[call-overload]
        holder = world.holders[index]
        if holder.lease_id == lid:
            holder.committed += cost - upper
        return [spent(str(cost), lid, at=now, task=f"h{index}")]
    if kind == "return":
        holder = world.holders[a]
        if holder.lease_id is None:
            return []
        event = returned(holder.lease_id, str(holder.committed), holder.version + 1, at=now)
        world.holders[a] = _Holder()
        return [event]
    if kind == "reserve":
        req = BudgetReserve(
            reservation_id=f"r{n}", task_id=f"t{a}", provider="claude", amount_usd=b
        )  # type: ignore[arg-type]
        if not budget.admit(state, PROP_LIMITS, req, now).admitted:
            return []
        return [
            BudgetReserved(
                id=f"ev-{next(_ids)}",
                at=now,
                task_id=req.task_id,
                reservation_id=req.reservation_id,
                provider="claude",
                amount_usd=req.amount_usd,
                expires_at=now + timedelta(minutes=2),
            )
        ]
    if kind == "settle":
        holds = sorted(state.open_reservations().items())
        if not holds:
            return []
        rid, hold = holds[a % len(holds)]
        cost = (hold.amount_usd * int(b) / 100).quantize(Decimal("0.0001"))  # type: ignore[call-overload]
        return [spent(str(cost), rid, at=now, task=hold.task_id)]
    return _expire(world, state, a)


def _model(world: _World, event: Event) -> None:
    """What each lease should still commit: granted (lowered by a return) less its spend."""
    match event:
        case BudgetLeased():
            spent_on = world.leases.get(event.lease_id, (Decimal(0), Decimal(0)))[1]
            world.leases[event.lease_id] = (event.granted_usd, spent_on)
        case SpendRecorded() if event.reservation_id in world.leases:
            granted, spent_on = world.leases[event.reservation_id]
            world.leases[event.reservation_id] = (granted, spent_on + event.cost_usd)
        case BudgetLeaseReturned() if event.lease_id in world.leases:
            granted, spent_on = world.leases[event.lease_id]
            kept = min(granted, event.kept_usd)
            if event.reason == "expired" or kept <= spent_on:
                del world.leases[event.lease_id]
            else:
                world.leases[event.lease_id] = (kept, spent_on)
        case _:
            pass


def _lease(world: _World, state: BudgetState, index: int) -> list[Event]:
    holder = world.holders[index]
    lid = holder.lease_id or f"L{world.n}"
    request = BudgetLeaseRequest(lease_id=lid, holder=f"h{index}", min_usd=Decimal("0.01"))
    size, _ = lease_size(state, PROP_LIMITS, request, world.now, LEASE_MAX)
    if size == 0:
        return []
    existing = state.lease(lid)
    granted = (existing.granted_usd if existing else Decimal(0)) + size
    version = (existing.version if existing else 0) + 1
    world.holders[index] = _Holder(lid, granted, holder.committed, version)
    return [
        BudgetLeased(
            id=f"ev-{next(_ids)}",
            at=world.now,
            lease_id=lid,
            holder=f"h{index}",
            granted_usd=granted,
            expires_at=world.now + timedelta(minutes=10),
            version=version,
        )
    ]


def _expire(world: _World, state: BudgetState, minutes: int) -> list[Event]:
    """Time passes; the keeper expires reservations and leases. A router stops admitting
    against a lease well before its expiry, so its attempts end first (they are settled here)."""
    world.now += timedelta(minutes=minutes)
    now, events = world.now, []
    due = budget.expired_leases(state, now)
    for index, lid, upper in [f for f in world.in_flight if f[1] in due]:
        world.in_flight.remove((index, lid, upper))
        events.append(spent(str(upper), lid, at=now, task=f"h{index}"))
    for lid in due:
        lease = state.lease(lid)
        assert lease is not None
        events.append(returned(lid, "0", lease.version + 1, at=now, reason="expired"))
        for i, holder in enumerate(world.holders):
            if holder.lease_id == lid:
                world.holders[i] = _Holder()
    for rid in budget.expired(state, now):
        events.append(
            BudgetReleased(
                id=f"ev-{next(_ids)}", at=now, task_id="-", reservation_id=rid, reason="expired"
            )
        )
    return events


def _assert_within_limits(state: BudgetState, now: datetime) -> None:
    assert state.reserved_usd == sum(r.amount_usd for r in state.open_reservations().values())
    assert state.leased_usd == sum(lease.outstanding_usd for lease in state.leases.values())
    committed = state.reserved_usd + state.leased_usd
    assert state.spent_on(now.date()) + committed <= PROP_LIMITS.daily_usd  # type: ignore[operator]
    month = state.spent_in_month(now.date()) + committed
    assert month <= PROP_LIMITS.monthly_usd  # type: ignore[operator]


def _totals(state: BudgetState) -> object:
    return (
        dict(state.days),
        dict(state.months),
        state.total_spent_usd,
        state.reserved_usd,
        state.leased_usd,
        sorted(state.open_reservations()),
        dict(state.leases),
    )


def test_a_lease_whose_exact_spend_has_many_digits_still_expires_keeping_it() -> None:
    """The fold sums exactly; a lease's spend of $1.5 and $1E-50 has 51 digits. The event that
    returns it (and a spend priced to 53 places) must stay storable and readable: a bound on
    events' digits made every housekeeping tick fail on such a lease, and lost such a spend."""
    from events.codec import decode_event, encode
    from vapora.budget import without_expired

    tiny = spent("0.0000000000000000000000000000000000000000000000000000421", "L")
    state = fold(leased("L", "10"), spent("1.5", "L"), tiny)
    after = without_expired(state, T0 + timedelta(minutes=10))  # the lease expired
    assert after.leased_usd == 0 and after.lease("L") is None
    exact = Decimal("1.5000000000000000000000000000000000000000000000000000421")
    assert after.total_spent_usd == exact
    kept = returned("L", str(exact), version=1, reason="expired")
    assert decode_event(encode(kept)) == kept and decode_event(encode(tiny)) == tiny
