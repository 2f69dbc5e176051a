"""The cost ledger: a SQLite projection of the event log, and the report math over it.

:class:`Ledger` is the store the cost-ledger actor writes through. Each ``apply``/``apply_many``
writes the events' rows *and* the last applied stream sequence in one transaction (the
eventsourcing ``Tracking`` pattern), so a crash at any point neither loses nor double-counts an
event: on restart the actor resumes after :meth:`Ledger.last_sequence`. An event whose sequence
is at or below it, or whose id is already stored (a duplicate append), is skipped.

Tables: ``tracking`` (the last applied sequence), ``events`` (every event's seq, id, type, time
and task: "the ledger has every event exactly once") and ``spend`` (one row per
``spend_recorded``: tokens, cost, and the prices with their source and version). Money is stored
as decimal TEXT and summed in Python with :class:`~decimal.Decimal`, never as SQLite REAL.
Times are stored as fixed-width UTC ISO text (``2026-01-31T23:59:59.000000Z``) so that text order
is time order.

Report math (:func:`cost_report`, pure)
    * ``days_observed`` is the number of UTC calendar days from the first to the last day with
      spend in the window, inclusive (idle days between them count as observed days with zero);
      ``daily_average_usd`` = total / days_observed.
    * ``monthly_projection_usd`` is the current month's run rate: spend from the first of ``now``'s
      UTC month up to ``now`` / days elapsed (``now.day``, today counted as a whole day) * days in
      the month. It ignores the report window.
    * Averages and projections are rounded to micro-dollars; totals and breakdowns are exact.
"""

from __future__ import annotations

import calendar
import contextlib
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import islice
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import msgspec

from events.codec import event_tag
from events.contract import CostReport, Price
from events.log import Event, SpendRecorded
from vapora.errors import ConfigError

__all__ = ["Ledger", "LoggedEvent", "ReportRow", "SpendRow", "cost_report", "monthly_projection"]

_ZERO = Decimal(0)
_MICRO = Decimal("0.000001")
_CHUNK = 500  # rows per executemany inside one batch transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracking (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_sequence INTEGER NOT NULL
);
INSERT OR IGNORE INTO tracking (id, last_sequence) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    at TEXT NOT NULL,
    task_id TEXT
);
CREATE TABLE IF NOT EXISTS spend (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    at TEXT NOT NULL,
    task_id TEXT NOT NULL,
    task_type TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    reservation_id TEXT,
    attempt INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_usd TEXT NOT NULL,
    input_per_mtok TEXT NOT NULL,
    output_per_mtok TEXT NOT NULL,
    cache_read_per_mtok TEXT NOT NULL,
    cache_write_per_mtok TEXT NOT NULL,
    price_source TEXT NOT NULL,
    price_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_at ON spend (at);
"""

_SPEND_COLUMNS = (
    "seq, event_id, at, task_id, task_type, provider, model, reservation_id, attempt,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,"
    " input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok,"
    " price_source, price_version"
)
# A spend row is written only if this very (seq, id) won the events insert: a duplicate id under
# a new sequence leaves no second row.
_INSERT_SPEND = (
    f"INSERT OR IGNORE INTO spend ({_SPEND_COLUMNS}) SELECT {', '.join('?' * 20)}"
    " WHERE EXISTS (SELECT 1 FROM events WHERE seq = ? AND event_id = ?)"
)
_UPDATE_TRACKING = "UPDATE tracking SET last_sequence = ? WHERE id = 1"
_INSERT_EVENT = "INSERT OR IGNORE INTO events (seq, event_id, type, at, task_id) VALUES (?,?,?,?,?)"


class SpendRow(msgspec.Struct, frozen=True, kw_only=True):
    """One ``spend_recorded`` event as the ledger stores it."""

    seq: int
    event_id: str
    at: datetime
    task_id: str
    task_type: str
    provider: str
    model: str
    reservation_id: str | None
    attempt: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: Decimal
    price: Price


class LoggedEvent(msgspec.Struct, frozen=True):
    """One event the ledger has applied: its stream sequence, id, type tag, time and task."""

    seq: int
    event_id: str
    type: str
    at: datetime
    task_id: str | None


class ReportRow(msgspec.Struct, frozen=True, array_like=True):
    """The fields of one spend that a report groups by."""

    at: datetime
    provider: str
    model: str
    task_type: str
    cost_usd: Decimal


# --- the store ----------------------------------------------------------------------------------


class Ledger:
    """The SQLite projection. Open with ``await Ledger.open(path)``; close with ``aclose()``."""

    def __init__(self, db: aiosqlite.Connection, last_sequence: int) -> None:
        self._db = db
        self._last = last_sequence
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Ledger:
        """Open (creating if needed) the ledger database at ``path``."""
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")  # `vapora audit` may read as we write
            await db.executescript(_SCHEMA)
            return cls(db, await _read_last(db))
        except BaseException as exc:
            await db.close()  # its worker thread would keep the process alive
            if isinstance(exc, sqlite3.DatabaseError):
                raise ConfigError(
                    f"{path} is not a ledger this version can read ({exc}); move it aside and "
                    "the ledger is rebuilt from the event log"
                ) from exc
            raise

    async def aclose(self) -> None:
        """Close the database connection."""
        await self._db.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def last_sequence(self) -> int:
        """The stream sequence of the last event applied (0 before any)."""
        return self._last

    async def apply(self, event: Event, seq: int) -> bool:
        """Apply one event at stream sequence ``seq``; False if it was already applied."""
        return await self.apply_many([(event, seq)]) == 1

    async def apply_many(self, batch: Iterable[tuple[Event, int]]) -> int:
        """Apply ``(event, seq)`` pairs, in sequence order, in one transaction.

        Returns how many events were new. If anything fails midway, nothing of the batch is
        kept and the last sequence is unchanged.
        """
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                applied, last = await self._write(iter(batch), self._last)
                await self._db.execute(
                    "UPDATE tracking SET last_sequence = ? WHERE id = 1", (last,)
                )
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
            self._last = last
            return applied

    async def _rollback(self) -> None:
        # The original error matters more than a failed rollback (say, on a closed connection);
        # SQLite discards an uncommitted transaction on close or crash anyway.
        with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error, ValueError):
            await self._db.execute("ROLLBACK")

    async def _write(self, pairs: Iterable[tuple[Event, int]], last: int) -> tuple[int, int]:
        applied = 0
        while chunk := list(islice(pairs, _CHUNK)):
            events: list[tuple[Any, ...]] = []
            spends: list[tuple[Any, ...]] = []
            for event, seq in chunk:
                if seq <= last:
                    continue
                last = seq
                events.append(_event_row(event, seq))
                if isinstance(event, SpendRecorded):
                    spends.append((*_spend_row(event, seq), seq, event.id))
            cursor = await self._db.executemany(_INSERT_EVENT, events)
            applied += max(cursor.rowcount, 0)
            await self._db.executemany(_INSERT_SPEND, spends)
        return applied, last

    async def spend_rows(self) -> list[SpendRow]:
        """Every spend row, in sequence order."""
        cursor = await self._db.execute(f"SELECT {_SPEND_COLUMNS} FROM spend ORDER BY seq")
        return [_read_spend(row) for row in await cursor.fetchall()]

    async def logged_events(self) -> list[LoggedEvent]:
        """Every event applied, in sequence order."""
        cursor = await self._db.execute(
            "SELECT seq, event_id, type, at, task_id FROM events ORDER BY seq"
        )
        return [
            LoggedEvent(seq, event_id, type_, _parse(at), task_id)
            for seq, event_id, type_, at, task_id in await cursor.fetchall()
        ]

    async def report(
        self, since: datetime | None = None, until: datetime | None = None, *, now: datetime
    ) -> CostReport:
        """The cost report of spend in ``[since, until)`` (see :func:`cost_report`)."""
        rows = await self._report_rows(since, until)
        month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
        month = await self._report_rows(month_start, None, through=now)
        return cost_report(
            rows,
            since=since,
            until=until,
            now=now,
            month_to_date=sum((row.cost_usd for row in month), _ZERO),
            last_sequence=self._last,
        )

    async def _report_rows(
        self, since: datetime | None, until: datetime | None, through: datetime | None = None
    ) -> list[ReportRow]:
        clauses, params = [], []
        for clause, bound in (("at >= ?", since), ("at < ?", until), ("at <= ?", through)):
            if bound is not None:
                clauses.append(clause)
                params.append(_iso(bound))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = await self._db.execute(
            f"SELECT at, provider, model, task_type, cost_usd FROM spend{where}", params
        )
        return [
            ReportRow(_parse(at), provider, model, task_type, Decimal(cost))
            for at, provider, model, task_type, cost in await cursor.fetchall()
        ]


async def _read_last(db: aiosqlite.Connection) -> int:
    cursor = await db.execute("SELECT last_sequence FROM tracking WHERE id = 1")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _event_row(event: Event, seq: int) -> tuple[Any, ...]:
    return (seq, event.id, event_tag(event), _iso(event.at), getattr(event, "task_id", None))


def _spend_row(event: SpendRecorded, seq: int) -> tuple[Any, ...]:
    price = event.price
    return (
        seq,
        event.id,
        _iso(event.at),
        event.task_id,
        str(event.task_type),
        event.provider,
        event.model,
        event.reservation_id,
        event.attempt,
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_tokens,
        str(event.cost_usd),
        str(price.input_per_mtok),
        str(price.output_per_mtok),
        str(price.cache_read_per_mtok),
        str(price.cache_write_per_mtok),
        price.source,
        price.version,
    )


def _read_spend(row: sqlite3.Row | Sequence[Any]) -> SpendRow:
    (seq, event_id, at, task_id, task_type, provider, model, rid, attempt) = row[:9]
    tokens, cost, prices, (source, version) = row[9:13], row[13], row[14:18], row[18:20]
    return SpendRow(
        seq=seq,
        event_id=event_id,
        at=_parse(at),
        task_id=task_id,
        task_type=task_type,
        provider=provider,
        model=model,
        reservation_id=rid,
        attempt=attempt,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
        cost_usd=Decimal(cost),
        price=Price(
            input_per_mtok=Decimal(prices[0]),
            output_per_mtok=Decimal(prices[1]),
            cache_read_per_mtok=Decimal(prices[2]),
            cache_write_per_mtok=Decimal(prices[3]),
            source=source,
            version=version,
        ),
    )


def _iso(at: datetime) -> str:
    utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S.%f}Z"


def _utc_text(at: datetime) -> str:
    if at.tzinfo is not UTC:
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.isoformat()


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)  # 3.11+ reads the trailing Z as UTC


# --- the report math (pure) ---------------------------------------------------------------------


def cost_report(
    rows: Iterable[ReportRow],
    *,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
    month_to_date: Decimal,
    last_sequence: int = 0,
) -> CostReport:
    """Totals and breakdowns of ``rows`` (already restricted to the window), the daily average
    over the days observed and the month's projection from ``month_to_date`` at ``now``."""
    groups: dict[str, defaultdict[str, Decimal]] = {
        name: defaultdict(Decimal) for name in ("provider", "model", "task_type", "hour", "day")
    }
    total, calls = _ZERO, 0
    for row in rows:
        cost, stamp = row.cost_usd, _utc_text(row.at)
        total += cost
        calls += 1
        groups["provider"][row.provider] += cost
        groups["model"][row.model] += cost
        groups["task_type"][row.task_type] += cost
        groups["hour"][stamp[:13] + ":00Z"] += cost
        groups["day"][stamp[:10]] += cost
    days = _days_spanned(groups["day"])
    return CostReport(
        since=since,
        until=until,
        total_usd=total,
        calls=calls,
        by_provider=_sorted(groups["provider"]),
        by_model=_sorted(groups["model"]),
        by_task_type=_sorted(groups["task_type"]),
        by_hour=_sorted(groups["hour"]),
        by_day=_sorted(groups["day"]),
        days_observed=days,
        daily_average_usd=_micro(total / days) if days else _ZERO,
        monthly_projection_usd=monthly_projection(month_to_date, now),
        last_sequence=last_sequence,
    )


def monthly_projection(month_to_date: Decimal, now: datetime) -> Decimal:
    """This month's spend so far / days elapsed (today included) * days in the month."""
    now = now.astimezone(UTC)
    days_in_month = calendar.monthrange(now.year, now.month)[1]
    return _micro(month_to_date / now.day * days_in_month)


def _days_spanned(by_day: dict[str, Decimal]) -> int:
    if not by_day:
        return 0
    first, last = date.fromisoformat(min(by_day)), date.fromisoformat(max(by_day))
    return (last - first).days + 1


def _sorted(groups: dict[str, Decimal]) -> dict[str, Decimal]:
    return dict(sorted(groups.items()))


def _micro(value: Decimal) -> Decimal:
    return value.quantize(_MICRO, rounding=ROUND_HALF_EVEN)
