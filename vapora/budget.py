"""Budget state as a fold over the event log, the tier, and admission (DESIGN §4).

The money side's pure core. ``evolve(state, event)`` folds ``budget_reserved``, ``spend_recorded``,
``budget_released``, ``budget_leased`` and ``budget_lease_returned`` into a :class:`BudgetState`;
every other event type leaves it unchanged.
``tier``, ``admit``, ``expired`` and ``status`` read a state at a caller-given ``now``: no clock,
no I/O in here. The budget keeper actor is the shell around these functions.

Semantics
    * Spend lands in the UTC day and UTC month of the *event's own* ``at``, never of ``now``.
    * ``spend_recorded`` settles its reservation at the actual cost: the hold is closed and the cost
      counted. A spend with no (or an unknown, or an already closed) reservation still counts.
    * ``budget_released`` closes the hold; spend already recorded stays (a failed call keeps what
      the provider billed). Settling or releasing a closed reservation is a no-op, and so is a
      ``budget_reserved`` for an id already closed (it arrived after its own settlement).
    * A ``spend_recorded`` whose event id was already counted (a duplicate append that escaped
      JetStream's de-duplication window) is not counted twice, within :data:`CLOSED_RETENTION`.
    * With a stream sequence (``evolve(state, event, seq)``, :func:`catch_up`) an event at or
      below ``state.last_sequence`` is skipped, so restart = snapshot + tail is idempotent.

Leases (budget granted to a router, which admits attempts against it locally)
    * A lease commits ``outstanding = max(granted - spent, 0)``: ``budget_leased`` sets its
      cumulative ``granted``; a ``spend_recorded`` whose ``reservation_id`` is an open lease adds
      to the lease's ``spent`` (the money moves from committed to spent, never counted twice).
    * ``budget_lease_returned`` lowers ``granted`` to what the holder kept (spent or in flight);
      ``expired`` (or nothing left outstanding) closes the lease. Events of one lease carry a
      ``version``; one at or below the lease's version changes nothing (so folding a keeper's
      own event twice, or a duplicate, is harmless). A lease id once closed never reopens.
    * ``leased_usd`` (the sum of outstanding amounts) counts like open reservations everywhere:
      the tier, admission and :func:`lease_size`, which never grants beyond the next tier
      boundary, so near a limit leases shrink to nothing and admission is per attempt again.

Tier
    percent = max(daily %, monthly %), open reservations and outstanding leases counted. Normal
    below 50 %; NearThreshold from 50 % up to *and including* the warn threshold; Exceeded
    strictly above it.
    A limit of zero counts as 100 % used. No limits at all: always Normal.
    The tier enforced (and reported by :func:`status`) falls only with a margin
    (:func:`settle_tier`) from the last one announced: ``budget_tier_changed`` folds into
    ``state.announced`` (nothing else of the state moves, not even event time).

Retention (memory must not grow with the log)
    Pruning is driven by event time: it runs when an event is the first of a new UTC day (a scan
    of the retained maps once a day, not per event), so replay and live application prune alike:
    * days and months before the first day of the previous month are dropped;
    * a task's spend is dropped once it holds no open reservation and has had no event for
      the state's ``task_retention`` (:data:`TASK_RETENTION` unless the keeper's config says
      otherwise: ``[budget] task_retention_hours``; a task idle that long starts from zero again
      if it comes back);
    * ids of closed reservations, and of spend events counted, are forgotten
      :data:`CLOSED_RETENTION` after their event time.
    The all-time ``total_spent_usd`` and ``spend_events`` are never pruned (they are two numbers).

Performance
    The state is frozen at the boundary: :func:`replay` and :func:`catch_up` fold many events into
    one private, mutable builder and freeze once; :func:`evolve` copies only what one event touches
    (the big maps are sharded copy-on-write, so one event copies one shard, not the whole map).
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any, Generic, TypeVar

import msgspec

from events.contract import (
    EXACT_SUMS,
    MAX_AMOUNT,
    BudgetLeaseRequest,
    BudgetReserve,
    BudgetStatus,
    Tier,
    cents_to_usd,
)
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    BudgetTierChanged,
    Event,
    SpendRecorded,
)
from vapora import budget_view as views
from vapora.errors import ConfigError

__all__ = [
    "as_utc",
    "Admission",
    "BudgetLimits",
    "BudgetState",
    "CLOSED_RETENTION",
    "MAX_WATERMARK_STEP",
    "EMPTY",
    "Fold",
    "LEASE_FRACTION",
    "Lease",
    "Reservation",
    "TASK_RETENTION",
    "TaskSpend",
    "SHARDS",
    "ZERO",
    "admit",
    "catch_up",
    "evolve",
    "expired",
    "expired_leases",
    "without_expired",
    "lease_size",
    "percentages",
    "replay",
    "restore",
    "snapshot",
    "status",
    "settle_tier",
    "tier",
]

TASK_RETENTION = timedelta(days=1)
CLOSED_RETENTION = timedelta(days=1)
#: How far one event may move the fold's event time (the watermark, which prunes old days, idle
#: tasks and counted ids): an event stamped far ahead by a host whose clock is wrong moves it
#: this much, not to its stamp (one spend a quarter ahead used to drop the month's spend).
MAX_WATERMARK_STEP = timedelta(hours=1)
_LONG_AGO = datetime.min.replace(tzinfo=UTC)
_ZERO = Decimal(0)
#: The fold's arithmetic: amounts are sums and differences of the events' (up to the pricing's
#: 50 digits each); the default 28 digits rounded them (a hold of 31 digits, released, left
#: 1E-29 reserved for good; a day's total lost its last digits).
EXACT = EXACT_SUMS
ZERO = _ZERO
_HUNDRED = Decimal(100)
_NEAR_PERCENT = Decimal(50)
TIER_HYSTERESIS_PERCENT = Decimal(5)
_RANK = {Tier.NORMAL: 0, Tier.NEAR_THRESHOLD: 1, Tier.EXCEEDED: 2}
_SHARDS = 64  # a power of two; one event copies 1/64 of a big map in `evolve`
_MASK = _SHARDS - 1
SHARDS = _SHARDS
LEASE_FRACTION = Decimal("0.5")  # of the headroom to the next tier boundary, split among holders
_MICRO = Decimal("0.000001")

K = TypeVar("K")
V = TypeVar("V")
Shards = tuple[dict[K, V], ...]


# --- values -------------------------------------------------------------------------------------


class BudgetLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Configured limits in USD; ``None`` means unlimited. Build from the config's cents."""

    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    per_task_usd: Decimal | None = None
    warn_threshold_percent: Decimal = Decimal(90)

    def __post_init__(self) -> None:
        for name in ("daily_usd", "monthly_usd", "per_task_usd"):
            value = getattr(self, name)
            if value is not None and not (value.is_finite() and value >= 0):
                raise ConfigError(f"budget `{name}` must be a non-negative amount, got {value}")
        if not _NEAR_PERCENT <= self.warn_threshold_percent <= _HUNDRED:
            raise ConfigError(
                "`warn_threshold_percent` must be within 50..100,"
                f" got {self.warn_threshold_percent}"
            )

    @classmethod
    def from_cents(
        cls,
        *,
        daily_cents: Decimal | int | None = None,
        monthly_cents: Decimal | int | None = None,
        per_task_cents: Decimal | int | None = None,
        warn_threshold_percent: Decimal | int | float = 90,
    ) -> BudgetLimits:
        """Limits from the config's cents (``None`` = unlimited)."""
        return cls(
            daily_usd=_usd(daily_cents),
            monthly_usd=_usd(monthly_cents),
            per_task_usd=_usd(per_task_cents),
            warn_threshold_percent=Decimal(str(warn_threshold_percent)),
        )


def _usd(cents: Decimal | int | None) -> Decimal | None:
    return None if cents is None else cents_to_usd(cents)


class Reservation(msgspec.Struct, frozen=True, gc=False):
    """An open hold on the budget, from a ``budget_reserved`` event.

    (Like :class:`TaskSpend` and :class:`Lease`, not tracked by the cycle collector: it holds
    strings, amounts and times only, and a state holds many of them.)"""

    task_id: str
    provider: str
    amount_usd: Decimal
    reserved_at: datetime
    expires_at: datetime


class Lease(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Budget granted to a router (``holder``): ``granted_usd`` in all, ``spent_usd`` of it spent.

    ``returned``: its holder gave it back (it admits nothing more) but still had attempts in
    flight, so what it kept stays committed until spent or the lease expires.
    """

    holder: str
    granted_usd: Decimal
    spent_usd: Decimal = _ZERO
    expires_at: datetime
    version: int
    returned: bool = False

    @property
    def outstanding_usd(self) -> Decimal:
        """What the lease still commits: granted but not (yet) spent."""
        left = self.granted_usd - self.spent_usd
        return left if left > 0 else _ZERO


class TaskSpend(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One task's spend, its open holds, its lowest requested cap and its last event time."""

    spent_usd: Decimal
    held_usd: Decimal
    last_at: datetime
    cap_usd: Decimal | None = None


class Admission(msgspec.Struct, frozen=True):
    """The answer to a reservation request; ``reason`` is a human sentence either way."""

    admitted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The budget as of ``last_sequence``: a frozen value, never mutated once returned.

    ``days`` and ``months`` map a UTC day (a month: its first day) to the spend recorded in it.
    Read tasks and reservations through the methods; their maps are sharded internally.
    ``announced`` is the tier of the last ``budget_tier_changed``: the one the keeper enforces
    from (see :func:`settle_tier`).
    """

    last_sequence: int = 0
    announced: Tier = Tier.NORMAL
    watermark: datetime | None = None
    total_spent_usd: Decimal = _ZERO
    spend_events: int = 0
    reserved_usd: Decimal = _ZERO
    leased_usd: Decimal = _ZERO
    leases: Mapping[str, Lease] = field(default_factory=dict)
    days: Mapping[date, Decimal] = field(default_factory=dict)
    months: Mapping[date, Decimal] = field(default_factory=dict)
    next_prune: datetime | None = field(default=None, repr=False)
    #: How long a task with no event and no open hold is kept (``[budget]
    #: task_retention_hours``); set by the reader that enforces task caps (the keeper).
    task_retention: timedelta = field(default=TASK_RETENTION, repr=False)
    _tasks: Shards[str, TaskSpend] = field(default_factory=lambda: _empty_shards(), repr=False)
    _open: Shards[str, Reservation] = field(default_factory=lambda: _empty_shards(), repr=False)
    _closed: Shards[str, datetime] = field(default_factory=lambda: _empty_shards(), repr=False)
    _counted: Shards[str, datetime] = field(default_factory=lambda: _empty_shards(), repr=False)

    def spent_on(self, day: date) -> Decimal:
        """Spend recorded in the UTC calendar day ``day``."""
        return self.days.get(day, _ZERO)

    def spent_in_month(self, day: date) -> Decimal:
        """Spend recorded in the UTC calendar month containing ``day``."""
        return self.months.get(day.replace(day=1), _ZERO)

    def task(self, task_id: str) -> TaskSpend | None:
        """The task's spend and holds, or ``None`` if unknown (or pruned)."""
        return self._tasks[hash(task_id) & _MASK].get(task_id)

    def reservation(self, reservation_id: str) -> Reservation | None:
        """The open reservation with this id, if any."""
        return self._open[hash(reservation_id) & _MASK].get(reservation_id)

    @property
    def committed_usd(self) -> Decimal:
        """Money held but not spent: open reservations plus outstanding leases."""
        return self.reserved_usd + self.leased_usd

    def lease(self, lease_id: str) -> Lease | None:
        """The open lease with this id, if any."""
        return self.leases.get(lease_id)

    def is_closed(self, reservation_id: str) -> bool:
        """Whether this reservation (or lease) was closed (within retention)."""
        return reservation_id in self._closed[hash(reservation_id) & _MASK]

    def open_reservations(self) -> dict[str, Reservation]:
        """All open reservations, by id (a fresh dict)."""
        return _merged(self._open)

    def tasks(self) -> dict[str, TaskSpend]:
        """Every tracked task's spend (a fresh dict)."""
        return _merged(self._tasks)

    def capped_tasks(self, shard: int, after: str = "") -> list[tuple[str, TaskSpend]]:
        """The tasks with a cap in shard ``shard`` (0 to :data:`SHARDS` - 1), in task id order
        from the first id after ``after``: every shard, one after the other, is every task with
        a cap, each sorted alone (a page of them costs a sort of one 64th of the tasks)."""
        return sorted(
            (task_id, task)
            for task_id, task in self._tasks[shard].items()
            if task.cap_usd is not None and task_id > after
        )

    def closed_reservations(self) -> dict[str, datetime]:
        """Ids of reservations closed within retention, with when they closed (a fresh dict)."""
        return _merged(self._closed)


def _empty_shards() -> tuple[dict[K, V], ...]:
    return tuple({} for _ in range(_SHARDS))


def _merged(shards: Shards[K, V]) -> dict[K, V]:
    out: dict[K, V] = {}
    for shard in shards:
        out.update(shard)
    return out


def _sharded(items: Mapping[K, V]) -> Shards[K, V]:
    shards: Shards[K, V] = _empty_shards()
    for key, value in items.items():
        shards[hash(key) & _MASK][key] = value
    return shards


EMPTY = BudgetState()
"""The budget before any event."""


# --- the builder: mutable, private, copy-on-write over a frozen state ---------------------------


class _CowMap(Generic[K, V]):
    """A sharded map borrowed from a frozen state; a shard is copied before its first write."""

    __slots__ = ("_owned", "_shards")

    def __init__(self, shards: Shards[K, V]) -> None:
        self._shards = list(shards)
        self._owned = [False] * _SHARDS

    def get(self, key: K) -> V | None:
        return self._shards[hash(key) & _MASK].get(key)

    def __contains__(self, key: K) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def shard(self, index: int) -> dict[K, V]:
        """Shard ``index`` to read (``hash(key) & _MASK``)."""
        return self._shards[index]

    def writable(self, index: int) -> dict[K, V]:
        """Shard ``index`` to write, copied first if the frozen state still shares it."""
        if not self._owned[index]:
            self._shards[index] = dict(self._shards[index])
            self._owned[index] = True
        return self._shards[index]

    def set(self, key: K, value: V) -> None:
        index = hash(key) & _MASK
        shard = self._shards[index] if self._owned[index] else self.writable(index)
        shard[key] = value

    def pop(self, key: K) -> V | None:
        index = hash(key) & _MASK
        if key not in self._shards[index]:
            return None
        return self.writable(index).pop(key)

    def drop_where(self, stale: Callable[[V], bool]) -> None:
        for index, shard in enumerate(self._shards):
            doomed = [key for key, value in shard.items() if stale(value)]
            if doomed:
                writable = self.writable(index)
                for key in doomed:
                    del writable[key]

    def drop_before(self, cutoff: V) -> None:
        """Drop entries whose value (a time) is before ``cutoff``: the daily prune, no call
        per entry."""
        for index, shard in enumerate(self._shards):
            doomed = [key for key, value in shard.items() if value < cutoff]  # type: ignore[operator]
            if doomed:
                writable = self.writable(index)
                for key in doomed:
                    del writable[key]

    def drop_idle(self: _CowMap[str, TaskSpend], since: datetime) -> None:
        """Drop tasks holding nothing whose last event is before ``since``."""
        for index, shard in enumerate(self._shards):
            doomed = [k for k, t in shard.items() if t.last_at < since and not t.held_usd]
            if doomed:
                writable = self.writable(index)
                for key in doomed:
                    del writable[key]

    def values(self) -> Iterator[V]:
        for shard in self._shards:
            yield from shard.values()

    def freeze(self) -> Shards[K, V]:
        self._owned = [False] * _SHARDS  # the frozen state now shares every shard
        return tuple(self._shards)


class _Unusable(Exception):
    """An event's amount is one no sum can take (negative, past ``MAX_AMOUNT``): the fold passes
    the event by. (NaN raises ``decimal.InvalidOperation`` at the same comparison.)"""


class _Books:
    """The fold's working copy: mutated in place, frozen once into a :class:`BudgetState`."""

    __slots__ = (
        "announced",
        "closed",
        "counted",
        "days",
        "days_owned",
        "last_day",
        "last_month",
        "last_sequence",
        "leased",
        "leases",
        "leases_owned",
        "months",
        "months_owned",
        "next_prune",
        "open",
        "reserved",
        "spend_events",
        "task_retention",
        "tasks",
        "total",
        "watermark",
        "watermark_limit",
    )

    def __init__(self, state: BudgetState) -> None:
        self.last_sequence = state.last_sequence
        self.announced = state.announced
        self.watermark = state.watermark
        # Past this, an event's time is checked against MAX_WATERMARK_STEP (a comparison per
        # event instead of a subtraction; so one event moves it at most twice the step).
        self.watermark_limit = _LONG_AGO
        self.next_prune = state.next_prune
        self.task_retention = state.task_retention
        self.total = state.total_spent_usd
        self.spend_events = state.spend_events
        self.reserved = state.reserved_usd
        self.leased = state.leased_usd
        self.leases: dict[str, Lease] = state.leases  # type: ignore[assignment]
        self.leases_owned = False
        self.days: dict[date, Decimal] = state.days  # type: ignore[assignment]
        self.months: dict[date, Decimal] = state.months  # type: ignore[assignment]
        self.days_owned = self.months_owned = False
        self.last_day = self.last_month = date.min
        self.tasks: _CowMap[str, TaskSpend] = _CowMap(state._tasks)
        self.open: _CowMap[str, Reservation] = _CowMap(state._open)
        self.closed: _CowMap[str, datetime] = _CowMap(state._closed)
        self.counted: _CowMap[str, datetime] = _CowMap(state._counted)

    def freeze(self) -> BudgetState:
        self.days_owned = self.months_owned = self.leases_owned = False
        return self.view(frozen=True)

    def view(self, *, frozen: bool = False) -> BudgetState:
        """The state now; unless ``frozen``, sharing the maps this builder goes on writing."""
        return BudgetState(
            last_sequence=self.last_sequence,
            announced=self.announced,
            watermark=self.watermark,
            total_spent_usd=self.total,
            spend_events=self.spend_events,
            reserved_usd=self.reserved,
            leased_usd=self.leased,
            leases=self.leases,
            days=self.days,
            months=self.months,
            next_prune=self.next_prune,
            task_retention=self.task_retention,
            _tasks=self.tasks.freeze() if frozen else tuple(self.tasks._shards),
            _open=self.open.freeze() if frozen else tuple(self.open._shards),
            _closed=self.closed.freeze() if frozen else tuple(self.closed._shards),
            _counted=self.counted.freeze() if frozen else tuple(self.counted._shards),
        )

    def apply(self, event: Event | views.View) -> None:
        """Fold one event; every money event also advances event time (and may prune)."""
        handler = _HANDLERS.get(type(event))
        if handler is None:
            if type(event) in _TIER_CHANGES:  # the tier announced; not money, not event time
                self.announced = event.to_tier  # type: ignore[union-attr]
            return
        at: datetime = event.at  # type: ignore[union-attr]  # every type with a handler has it
        if at.tzinfo is not UTC:
            at = _utc(at)
        try:
            handler(self, event, at)
        except (_Unusable, decimal.InvalidOperation):
            return  # an amount no sum can take (NaN compares as invalid): passed by, as the
            # live path's decoder makes such an event unreadable
        # The tick, inlined: it runs for every money event of every replay. Event time moves
        # on by at most about MAX_WATERMARK_STEP per event (see there).
        mark = self.watermark
        if mark is None:
            self.watermark, self.watermark_limit = at, at + MAX_WATERMARK_STEP
        elif at > mark:
            if at > self.watermark_limit:
                self.watermark_limit = limit = mark + MAX_WATERMARK_STEP
                if at > limit:
                    at = limit
            self.watermark = at
        due = self.next_prune
        if due is None or at >= due:
            self.new_day(at)

    def released(self, event: BudgetReleased, at: datetime) -> None:
        self.close(event.reservation_id, event.task_id, at, _ZERO)

    def leased_to(self, event: BudgetLeased, at: datetime) -> None:
        if not _ZERO <= event.granted_usd <= MAX_AMOUNT:
            raise _Unusable
        lid = event.lease_id
        old = self.leases.get(lid)
        if old is None and lid not in self.closed:
            new = Lease(
                holder=event.holder,
                granted_usd=event.granted_usd,
                expires_at=_utc(event.expires_at),
                version=event.version,
            )
            self.put_lease(lid, None, new)
        elif old is not None and event.version > old.version:
            new = Lease(
                holder=old.holder,
                granted_usd=event.granted_usd,
                spent_usd=old.spent_usd,
                expires_at=_utc(event.expires_at),
                version=event.version,
                returned=old.returned,
            )
            self.put_lease(lid, old, new)

    def lease_returned(self, event: BudgetLeaseReturned, at: datetime) -> None:
        if not _ZERO <= event.kept_usd <= MAX_AMOUNT:
            raise _Unusable
        lid = event.lease_id
        old = self.leases.get(lid)
        if old is None or event.version <= old.version:
            return
        kept = event.kept_usd if event.kept_usd < old.granted_usd else old.granted_usd
        new = Lease(
            holder=old.holder,
            granted_usd=kept,
            spent_usd=old.spent_usd,
            expires_at=old.expires_at,
            version=event.version,
            returned=True,
        )
        if event.reason == "expired" or new.outstanding_usd == 0:
            self.put_lease(lid, old, None)
            self.closed.set(lid, at)
        else:
            self.put_lease(lid, old, new)

    def put_lease(self, lid: str, old: Lease | None, new: Lease | None) -> None:
        if not self.leases_owned:
            self.leases, self.leases_owned = dict(self.leases), True
        before = _ZERO if old is None else old.outstanding_usd
        after = _ZERO if new is None else new.outstanding_usd
        self.leased += after - before
        if new is None:
            self.leases.pop(lid, None)
        else:
            self.leases[lid] = new

    def spend_on_lease(self, lid: str, lease: Lease, cost: Decimal) -> None:
        self.put_lease(
            lid,
            lease,
            Lease(
                holder=lease.holder,
                granted_usd=lease.granted_usd,
                spent_usd=lease.spent_usd + cost,
                expires_at=lease.expires_at,
                version=lease.version,
                returned=lease.returned,
            ),
        )

    # The two hot paths below index each sharded map once per key: a reservation id has the
    # same shard in the open and the closed map.

    def reserve(self, event: BudgetReserved, at: datetime) -> None:
        # Amounts are checked here, not in the replay's views (a fifth of their decoding): an
        # event whose amount no sum can take is passed by (see apply), before anything changes.
        limit = event.task_limit_usd
        if not _ZERO <= event.amount_usd <= MAX_AMOUNT or (
            limit is not None and not _ZERO <= limit <= MAX_AMOUNT
        ):
            raise _Unusable
        rid = event.reservation_id
        index = hash(rid) & _MASK
        amount = _ZERO
        opened = self.open
        if rid not in opened._shards[index] and rid not in self.closed._shards[index]:
            amount = event.amount_usd
            shard = opened._shards[index] if opened._owned[index] else opened.writable(index)
            expires = event.expires_at
            shard[rid] = Reservation(
                event.task_id,
                event.provider,
                amount,
                at,
                expires if expires.tzinfo is UTC else _utc(expires),
            )
            self.reserved += amount
        # Touched even when ignored, so the task's cap and last activity do not depend on order.
        self.touch_task(event.task_id, at, _ZERO, amount, event.task_limit_usd)

    def spend(self, event: SpendRecorded, at: datetime) -> None:
        cost = event.cost_usd
        if not _ZERO <= cost <= MAX_AMOUNT:
            raise _Unusable
        eid, counted = event.id, self.counted
        index = hash(eid) & _MASK
        shard = counted._shards[index]
        if eid in shard:
            return
        (shard if counted._owned[index] else counted.writable(index))[eid] = at
        day = at.date()
        if day != self.last_day:
            self.last_day, self.last_month = day, day.replace(day=1)
        if not self.days_owned:
            self.days, self.days_owned = dict(self.days), True
        if not self.months_owned:
            self.months, self.months_owned = dict(self.months), True
        days, months, month = self.days, self.months, self.last_month
        spent = days.get(day)
        days[day] = cost if spent is None else spent + cost
        spent = months.get(month)
        months[month] = cost if spent is None else spent + cost
        self.total += cost
        self.spend_events += 1
        rid = event.reservation_id
        lease = self.leases.get(rid) if self.leases and rid is not None else None
        if lease is not None:
            self.spend_on_lease(rid, lease, cost)  # type: ignore[arg-type]
            self.touch_task(event.task_id, at, cost, _ZERO, None)
        else:
            self.close(rid, event.task_id, at, cost)

    def close(self, rid: str | None, task_id: str, at: datetime, cost: Decimal) -> None:
        """Close ``rid`` (if given and open) and add ``cost`` to ``task_id``'s spend."""
        if rid is None:
            self.touch_task(task_id, at, cost, _ZERO, None)
            return
        index, opened, closed = hash(rid) & _MASK, self.open, self.closed
        held = None
        if rid in opened._shards[index]:
            shard = opened._shards[index] if opened._owned[index] else opened.writable(index)
            held = shard.pop(rid)
        times = closed._shards[index]
        if rid not in times:
            (times if closed._owned[index] else closed.writable(index))[rid] = at
        if held is None:
            self.touch_task(task_id, at, cost, _ZERO, None)
            return
        self.reserved -= held.amount_usd
        if held.task_id == task_id:
            self.touch_task(task_id, at, cost, -held.amount_usd, None)
        else:
            self.touch_task(task_id, at, cost, _ZERO, None)
            self.touch_task(held.task_id, at, _ZERO, -held.amount_usd, None)

    def touch_task(
        self, task_id: str, at: datetime, spent: Decimal, held: Decimal, cap: Decimal | None
    ) -> None:
        tasks, index = self.tasks, hash(task_id) & _MASK
        shard = tasks._shards[index] if tasks._owned[index] else tasks.writable(index)
        old = shard.get(task_id)
        if old is None:
            shard[task_id] = TaskSpend(spent, held, at, cap)
            return
        if old.cap_usd is not None and (cap is None or old.cap_usd < cap):
            cap = old.cap_usd
        last = at if at > old.last_at else old.last_at
        shard[task_id] = TaskSpend(
            old.spent_usd + spent if spent else old.spent_usd,
            old.held_usd + held if held else old.held_usd,
            last,
            cap,
        )

    def new_day(self, at: datetime) -> None:
        if self.next_prune is not None:
            self.prune(at)
        self.next_prune = _next_midnight(at)

    def prune(self, now: datetime) -> None:
        keep_from = _previous_month(now.date())
        if any(day < keep_from for day in self.days):
            self.days = {d: v for d, v in self.days.items() if d >= keep_from}
            self.days_owned = True
        if any(month < keep_from for month in self.months):
            self.months = {m: v for m, v in self.months.items() if m >= keep_from}
            self.months_owned = True
        idle_since, closed_before = now - self.task_retention, now - CLOSED_RETENTION
        self.tasks.drop_idle(idle_since)
        self.closed.drop_before(closed_before)
        self.counted.drop_before(closed_before)


_Handler = Callable[[_Books, Any, datetime], None]
# Each event type, and its view (``vapora.budget_view``: only the fields read, for bulk replays).
_HANDLERS: dict[type, _Handler] = {
    SpendRecorded: _Books.spend,
    BudgetReserved: _Books.reserve,
    BudgetReleased: _Books.released,
    BudgetLeased: _Books.leased_to,
    BudgetLeaseReturned: _Books.lease_returned,
    views.SpendRecordedView: _Books.spend,
    views.BudgetReservedView: _Books.reserve,
    views.BudgetReleasedView: _Books.released,
    views.BudgetLeasedView: _Books.leased_to,
    views.LeaseReturnedView: _Books.lease_returned,
}

_TIER_CHANGES = frozenset({BudgetTierChanged, views.BudgetTierChangedView})


def as_utc(at: datetime) -> datetime:
    """An event's time in UTC, as the fold takes it (a naive time is taken at its word)."""
    return _utc(at)


def _utc(at: datetime) -> datetime:
    if at.tzinfo is UTC:  # the common case: msgspec decodes "Z" to this very object
        return at
    if at.tzinfo is None:  # the contract says UTC; a naive timestamp is taken at its word
        return at.replace(tzinfo=UTC)
    return at.astimezone(UTC)


def _next_midnight(at: datetime) -> datetime:
    return at.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def _previous_month(day: date) -> date:
    first = day.replace(day=1)
    return (first - timedelta(days=1)).replace(day=1)


# --- the fold -----------------------------------------------------------------------------------


def evolve(state: BudgetState, event: Event, seq: int | None = None) -> BudgetState:
    """The state after ``event``. With ``seq`` (its stream sequence), an event already applied
    (``seq <= state.last_sequence``) returns ``state`` unchanged."""
    if seq is not None and seq <= state.last_sequence:
        return state
    if not isinstance(
        event,
        SpendRecorded
        | BudgetReserved
        | BudgetReleased
        | BudgetLeased
        | BudgetLeaseReturned
        | BudgetTierChanged,
    ):
        return state if seq is None else _with_sequence(state, seq)
    books = _Books(state)
    with decimal.localcontext(EXACT):
        books.apply(event)
    if seq is not None:
        books.last_sequence = seq
    return books.freeze()


def _with_sequence(state: BudgetState, seq: int) -> BudgetState:
    books = _Books(state)
    books.last_sequence = seq
    return books.freeze()


def replay(events: Iterable[Event], state: BudgetState = EMPTY) -> BudgetState:
    """Fold ``events`` (without sequences) into ``state``: the fast path for whole-log replays."""
    books = _Books(state)
    with decimal.localcontext(EXACT):
        for event in events:
            books.apply(event)
    return books.freeze()


def catch_up(state: BudgetState, tail: Iterable[tuple[Event, int]]) -> BudgetState:
    """Fold ``(event, stream_seq)`` pairs into ``state``, skipping those already applied.
    (Many batches in a row: :class:`Fold`.)"""
    fold = Fold(state)
    fold.apply(tail)
    return fold.state()


class Fold:
    """A fold in progress over many batches: :func:`catch_up` without a frozen state between
    them (each freeze makes the next batch copy every shard it writes), frozen once at the end.

    ``apply`` takes ``(event, stream_seq)`` pairs; ``apply_sequenced`` a replay's batch as read
    (the sequences and the events side by side), so no pairs are built.
    """

    __slots__ = ("_books",)

    def __init__(self, state: BudgetState = EMPTY) -> None:
        self._books = _Books(state)

    @property
    def last_sequence(self) -> int:
        return self._books.last_sequence

    @property
    def announced(self) -> Tier:
        """The tier of the last ``budget_tier_changed`` folded."""
        return self._books.announced

    def apply(self, tail: Iterable[tuple[Event | views.View, int]]) -> None:
        books = self._books
        with decimal.localcontext(EXACT):
            for event, seq in tail:
                if seq > books.last_sequence:
                    books.apply(event)
                    books.last_sequence = seq

    def apply_sequenced(self, seqs: Sequence[int], events: Sequence[Event | views.View]) -> None:
        """Fold ``events`` at their stream sequences ``seqs`` (increasing, one each), skipping
        those already applied: a replay's batch as read, no pair or entry made per event."""
        books = self._books
        if not seqs:
            return
        if seqs[0] > books.last_sequence:  # the usual case: all of them are new
            apply = books.apply
            with decimal.localcontext(EXACT):
                for event in events:
                    apply(event)
            books.last_sequence = seqs[-1]
        else:
            self.apply(zip(events, seqs, strict=True))

    def apply_event(self, event: Event | views.View) -> None:
        """Fold one event without its sequence (a writer folding its own append before the log
        brings it back with one; folding an event twice changes nothing)."""
        with decimal.localcontext(EXACT):
            self._books.apply(event)

    def state(self) -> BudgetState:
        """The state so far (a frozen value; folding may go on afterwards)."""
        return self._books.freeze()

    def view(self) -> BudgetState:
        """The state now, *sharing* the maps the fold goes on writing: to read before the next
        ``apply``, never to keep (that is :meth:`state`). It copies nothing: the live budget
        keeper, which reads its state after every event, had frozen it every time, and each
        freeze makes the next write copy a 64th of the map it writes (2 ms per event once a
        day's maps held a million events)."""
        return self._books.view()


# --- reading the state at a given time ----------------------------------------------------------


def percentages(state: BudgetState, limits: BudgetLimits, now: datetime) -> tuple[Decimal, Decimal]:
    """Daily and monthly percent used at ``now``, open reservations and leases counted."""
    today = _utc(now).date()
    held = state.reserved_usd + state.leased_usd
    daily = _percent(state.spent_on(today) + held, limits.daily_usd)
    monthly = _percent(state.spent_in_month(today) + held, limits.monthly_usd)
    return daily, monthly


def _percent(used: Decimal, limit: Decimal | None) -> Decimal:
    if limit is None:
        return _ZERO
    if limit == 0:
        return _HUNDRED  # nothing paid fits a zero limit
    return used * _HUNDRED / limit


def tier(state: BudgetState, limits: BudgetLimits, now: datetime) -> Tier:
    """Normal below 50 %, NearThreshold from 50 % to the warn threshold inclusive, then Exceeded."""
    return _tier_of(max(percentages(state, limits, now)), limits)


def settle_tier(
    previous: Tier,
    state: BudgetState,
    limits: BudgetLimits,
    now: datetime,
    hysteresis_percent: Decimal = TIER_HYSTERESIS_PERCENT,
) -> Tier:
    """The tier to announce, given the one announced before.

    A rise is announced at once. A fall only once the percentage is ``hysteresis_percent``
    points below the boundary it crosses (below 45 % to leave NearThreshold, at or below 85 %
    to leave Exceeded, with the defaults): open reservations count towards the percentage, so
    without the margin every hold opened and settled near a boundary would flip the tier.
    """
    percent = max(percentages(state, limits, now))
    raw = _tier_of(percent, limits)
    if _RANK[raw] >= _RANK[previous]:
        return raw
    lowered = _tier_of(percent + hysteresis_percent, limits)
    return lowered if _RANK[lowered] < _RANK[previous] else previous


def _tier_of(percent: Decimal, limits: BudgetLimits) -> Tier:
    if percent > limits.warn_threshold_percent:
        return Tier.EXCEEDED
    if percent >= _NEAR_PERCENT:
        return Tier.NEAR_THRESHOLD
    return Tier.NORMAL


def admit(
    state: BudgetState, limits: BudgetLimits, request: BudgetReserve, now: datetime
) -> Admission:
    """Does ``request`` fit the daily, monthly and task limits with every open hold counted?

    The task's cap is the lowest of the configured per-task limit, the request's
    ``task_limit_usd`` and any lower cap an earlier reservation of the task asked for.
    A zero amount always fits; an id already open is admitted again (the fold ignores the
    duplicate); an id already settled or released is refused.
    """
    rid = request.reservation_id
    if state.reservation(rid) is not None:
        return Admission(True, f"reservation {rid} is already open")
    if state.is_closed(rid):
        return Admission(False, f"reservation {rid} was already settled or released")
    if request.amount_usd == 0:
        return Admission(True, "a zero amount fits every limit")
    with decimal.localcontext(EXACT):  # the sums it compares, exact as the fold's
        refusal = _refusal(state, limits, request, _utc(now).date())
    return Admission(refusal is None, refusal or "fits the daily, monthly and task limits")


def _refusal(
    state: BudgetState, limits: BudgetLimits, request: BudgetReserve, today: date
) -> str | None:
    amount, held = request.amount_usd, state.reserved_usd + state.leased_usd
    task = state.task(request.task_id)
    checks = (
        ("daily", limits.daily_usd, state.spent_on(today), held),
        ("monthly", limits.monthly_usd, state.spent_in_month(today), held),
        (
            f"task {request.task_id}",
            _task_cap(limits, request, task),
            task.spent_usd if task else _ZERO,
            task.held_usd if task else _ZERO,
        ),
    )
    for name, limit, spent, holds in checks:
        if limit is not None and spent + holds + amount > limit:
            remembered = (
                task is not None
                and task.cap_usd == limit
                and name.startswith("task ")
                and (request.task_limit_usd is None or request.task_limit_usd > limit)
            )
            why = (
                " (the lowest cap a request of this task asked for: a cap only lowers)"
                if remembered
                else ""
            )
            return (
                f"{name} limit ${_shown(limit)}{why} would be exceeded: spent ${_shown(spent)} "
                f"+ held ${_shown(holds)} + this ${_shown(amount)} = "
                f"${_shown(spent + holds + amount)}"
            )
    return None


def _shown(amount: Decimal) -> str:
    """``amount`` in a message: plain digits (``0.0000009``, not ``9E-7``), a zero as ``0``."""
    return format(_plain(amount), "f")


def _plain(amount: Decimal) -> Decimal:
    """``amount``, a zero as ``0`` (a zero of a sum of seven-place amounts shows as ``0E-7``)."""
    return amount if amount else _ZERO


def _task_cap(
    limits: BudgetLimits, request: BudgetReserve, task: TaskSpend | None
) -> Decimal | None:
    caps = [limits.per_task_usd, request.task_limit_usd, task.cap_usd if task else None]
    present = [cap for cap in caps if cap is not None]
    return min(present) if present else None


def lease_size(
    state: BudgetState,
    limits: BudgetLimits,
    request: BudgetLeaseRequest,
    now: datetime,
    max_usd: Decimal,
    fraction: Decimal = LEASE_FRACTION,
) -> tuple[Decimal, str]:
    """How much to add to the lease ``request`` asks for (grant or extend), and why.

    ``fraction`` of the headroom up to the next tier boundary (50 % while below it, then the
    warn threshold) of the daily and of the monthly limit, open reservations and leases counted,
    split among the holders of open leases; capped so that the lease's outstanding amount stays
    within ``max_usd``. Zero (a refusal) when that is less than ``request.min_usd``: near a limit
    (or Exceeded) no lease is granted and attempts reserve one at a time, so every limit holds
    exactly. The headroom is never granted whole, so a lease never moves the tier on its own.
    """
    lid, holder = request.lease_id, request.holder
    existing = state.lease(lid)
    if existing is None and state.is_closed(lid):
        return _ZERO, f"lease {lid} was already returned or expired"
    if existing is not None and (existing.holder != holder or existing.returned):
        return _ZERO, f"lease {lid} is not open for {holder}"
    room = max_usd - (existing.outstanding_usd if existing else _ZERO)
    holders = {lease.holder for lease in state.leases.values() if not lease.returned}
    share = fraction / len(holders | {holder})
    today = _utc(now).date()
    windows = (
        ("daily", limits.daily_usd, state.spent_on(today)),
        ("monthly", limits.monthly_usd, state.spent_in_month(today)),
    )
    why = f"the lease size of ${max_usd}"
    for name, limit, spent in windows:
        if limit is None:
            continue
        used = spent + state.reserved_usd + state.leased_usd
        boundary = _next_boundary(used, limit, limits.warn_threshold_percent)
        if (boundary - used) * share < room:
            room = (boundary - used) * share
            why = f"the {name} headroom of ${boundary - used:.6f} below ${boundary:.6f}"
    amount = room.quantize(_MICRO, rounding=ROUND_DOWN) if room > 0 else _ZERO
    if amount <= 0 or amount < request.min_usd:
        return _ZERO, f"{why} leaves no lease of at least ${request.min_usd}"
    return amount, f"${amount} granted: limited by {why}"


def _next_boundary(used: Decimal, limit: Decimal, warn_percent: Decimal) -> Decimal:
    """The amount at the tier boundary above ``used``: 50 % of ``limit``, then the warn line."""
    percent = _NEAR_PERCENT if used * _HUNDRED < limit * _NEAR_PERCENT else warn_percent
    return limit * percent / _HUNDRED


def without_expired(state: BudgetState, now: datetime) -> BudgetState:
    """``state`` once the keeper's tick at ``now`` has closed what expired (reservations
    released, leases closed keeping what they spent), folded here without appending anything:
    for reading a stopped deployment's log, whose holds were open when it stopped."""
    fold = Fold(state)
    for rid in expired(state, now):
        held = state.reservation(rid)
        assert held is not None
        fold.apply_event(
            BudgetReleased(
                id=f"expired-{rid}",
                at=now,
                task_id=held.task_id,
                reservation_id=rid,
                reason="expired",
            )
        )
    for lid in expired_leases(state, now):
        lease = state.lease(lid)
        assert lease is not None
        fold.apply_event(
            BudgetLeaseReturned(
                id=f"expired-{lid}",
                at=now,
                lease_id=lid,
                holder=lease.holder,
                kept_usd=min(lease.spent_usd, lease.granted_usd),
                reason="expired",
                version=lease.version + 1,
            )
        )
    return fold.state()


def expired_leases(state: BudgetState, now: datetime) -> list[str]:
    """Ids of open leases whose expiry is at or before ``now``, oldest expiry first."""
    now = _utc(now)
    due = [
        (lease.expires_at, lid) for lid, lease in state.leases.items() if lease.expires_at <= now
    ]
    return [lid for _, lid in sorted(due)]


def expired(state: BudgetState, now: datetime) -> list[str]:
    """Ids of open reservations whose expiry is at or before ``now``, oldest expiry first."""
    now = _utc(now)
    due = [
        (r.expires_at, rid) for rid, r in state.open_reservations().items() if r.expires_at <= now
    ]
    return [rid for _, rid in sorted(due)]


def status(state: BudgetState, limits: BudgetLimits, now: datetime) -> BudgetStatus:
    """What ``vapora.budget`` answers: limits, spend, holds, percentages and the tier at ``now``.

    The tier is the one enforced: :func:`settle_tier` from ``state.announced``, so after
    Exceeded it stays Exceeded until the percentage is 5 points below the warn threshold, as the
    keeper refuses paid reservations until then (a router loads this tier when it starts)."""
    today = _utc(now).date()
    daily, monthly = percentages(state, limits, now)
    return BudgetStatus(
        at=_utc(now),
        tier=settle_tier(state.announced, state, limits, now),
        daily_limit_usd=limits.daily_usd,
        monthly_limit_usd=limits.monthly_usd,
        per_task_limit_usd=limits.per_task_usd,
        spent_today_usd=_plain(state.spent_on(today)),
        spent_month_usd=_plain(state.spent_in_month(today)),
        reserved_usd=_plain(state.reserved_usd),
        open_reservations=sum(len(shard) for shard in state._open),
        daily_percent=float(daily),
        monthly_percent=float(monthly),
        warn_threshold_percent=float(limits.warn_threshold_percent),
        leased_usd=_plain(state.leased_usd),
        open_leases=len(state.leases),
    )


# --- snapshots ----------------------------------------------------------------------------------


class _Snapshot(msgspec.Struct, kw_only=True):
    version: int = 1
    last_sequence: int
    watermark: datetime | None
    next_prune: datetime | None
    total_spent_usd: Decimal
    spend_events: int
    reserved_usd: Decimal
    days: dict[date, Decimal]
    months: dict[date, Decimal]
    tasks: dict[str, TaskSpend]
    open: dict[str, Reservation]
    closed: dict[str, datetime]
    counted: dict[str, datetime]
    leased_usd: Decimal = _ZERO
    leases: dict[str, Lease] = {}
    announced: Tier = Tier.NORMAL  # Normal in snapshots written before it was kept


_snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot)
_snapshot_encoder = msgspec.msgpack.Encoder(decimal_format="string")


def snapshot(state: BudgetState) -> bytes:
    """The state as msgpack bytes, ``last_sequence`` included: restart = restore + tail."""
    return _snapshot_encoder.encode(
        _Snapshot(
            last_sequence=state.last_sequence,
            watermark=state.watermark,
            next_prune=state.next_prune,
            total_spent_usd=state.total_spent_usd,
            spend_events=state.spend_events,
            reserved_usd=state.reserved_usd,
            days=dict(state.days),
            months=dict(state.months),
            tasks=state.tasks(),
            open=state.open_reservations(),
            closed=state.closed_reservations(),
            counted=_merged(state._counted),
            leased_usd=state.leased_usd,
            leases=dict(state.leases),
            announced=state.announced,
        )
    )


def restore(data: bytes) -> BudgetState:
    """The state a :func:`snapshot` was taken of."""
    snap = _snapshot_decoder.decode(data)
    return BudgetState(
        last_sequence=snap.last_sequence,
        announced=snap.announced,
        watermark=snap.watermark,
        total_spent_usd=snap.total_spent_usd,
        spend_events=snap.spend_events,
        reserved_usd=snap.reserved_usd,
        leased_usd=snap.leased_usd,
        leases=snap.leases,
        days=snap.days,
        months=snap.months,
        next_prune=snap.next_prune,
        _tasks=_sharded(snap.tasks),
        _open=_sharded(snap.open),
        _closed=_sharded(snap.closed),
        _counted=_sharded(snap.counted),
    )
