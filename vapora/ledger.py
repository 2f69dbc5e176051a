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

Writers and readers
    :meth:`Ledger.open` is the one writer's (the cost-ledger actor): it creates the file and its
    tables if they are missing, and writes nothing else when it opens (but for adding the
    columns added since, once, to a file made before them). Everyone else (``vapora
    audit``, an offline report) opens with :meth:`Ledger.open_read_only`: SQLite's ``mode=ro``, no
    schema written, no lock a writer waits for, and a missing file is an error, never an empty
    ledger. Each read that needs several queries (:meth:`Ledger.snapshot`, :meth:`Ledger.report`,
    :meth:`Ledger.period_spend`) runs them in one read transaction, so it sees one committed state.
    A file SQLite cannot read as a ledger is a :class:`~vapora.errors.ConfigError` that says to
    move it aside (the actor rebuilds it from the log); a lock held longer than the busy wait
    (another process writing) is a :class:`~vapora.errors.RequestTimeout` that says the ledger is
    busy, and that the file is fine.

Report math (:func:`cost_report`, pure)
    * ``days_observed`` is the number of UTC calendar days from the first to the last day with
      spend in the window, inclusive (idle days between them count as observed days with zero);
      ``daily_average_usd`` = total / days_observed.
    * ``monthly_projection_usd`` is the current month's run rate: spend from the first of ``now``'s
      UTC month up to ``now`` / the days of the month observed (from the UTC day of the month's
      first spend to today, both counted whole) * days in the month. It ignores the report
      window.
    * Averages and projections are rounded to micro-dollars; totals and breakdowns are exact.
"""

from __future__ import annotations

import calendar
import contextlib
import decimal
import logging
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import islice
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import msgspec

from events.codec import event_tag
from events.contract import EXACT_SUMS, CostReport, Price, PriceTier
from events.log import Event, SpendRecorded
from vapora.errors import ConfigError, RequestTimeout, VaporaError

__all__ = [
    "Ledger",
    "LoggedEvent",
    "PeriodSpend",
    "ReportRow",
    "ReportSums",
    "SpendRow",
    "cost_report",
    "monthly_projection",
    "period_spend",
]

log = logging.getLogger("vapora.ledger")

_ZERO = Decimal(0)
_MICRO = Decimal("0.000001")
_CHUNK = 500  # rows per executemany inside one batch transaction
_READ_CHUNK = 2_000  # rows a report reads at a time (it keeps sums, never the rows)
_BUSY_MS = 5000  # how long a connection waits for another's lock before it says the ledger is busy
# SQLite's primary result codes: a lock held by another connection, and a file that is no ledger
# (not a database, damaged, or without the tables and columns this version reads).
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_NOT_A_LEDGER_CODES = frozenset(
    {
        sqlite3.SQLITE_ERROR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_SCHEMA,
        sqlite3.SQLITE_MISMATCH,
        sqlite3.SQLITE_FORMAT,
    }
)
_TABLES = frozenset({"tracking", "events", "spend", "spend_at"})

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
    price_version TEXT NOT NULL,
    price_tiers TEXT,
    cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_1h_per_mtok TEXT
);
CREATE INDEX IF NOT EXISTS spend_at ON spend (at);
"""
# Columns added after the first ledgers were made, with what a row without them holds: the
# price's long-context tiers (JSON; NULL: none), the hour-long cache writes and their rate
# (NULL: the other writes' rate). A writer adds those missing to an older file when it opens it.
_ADDED_COLUMNS: dict[str, tuple[str, str]] = {
    "price_tiers": ("TEXT", "NULL"),
    "cache_write_1h_tokens": ("INTEGER NOT NULL DEFAULT 0", "0"),
    "cache_write_1h_per_mtok": ("TEXT", "NULL"),
}

_SPEND_COLUMNS = (
    "seq, event_id, at, task_id, task_type, provider, model, reservation_id, attempt,"
    " input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,"
    " input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok,"
    " price_source, price_version, price_tiers, cache_write_1h_tokens, cache_write_1h_per_mtok"
)
# A spend row is written only if this very (seq, id) won the events insert: a duplicate id under
# a new sequence leaves no second row.
_INSERT_SPEND = (
    f"INSERT OR IGNORE INTO spend ({_SPEND_COLUMNS}) SELECT {', '.join('?' * 23)}"
    " WHERE EXISTS (SELECT 1 FROM events WHERE seq = ? AND event_id = ?)"
)


def _spend_columns(missing: set[str]) -> str:
    """What a reader selects from a file without the ``missing`` columns (read-only: not
    migrated): what a row without them holds in their place."""
    columns = _SPEND_COLUMNS
    for name in missing:
        columns = columns.replace(name, _ADDED_COLUMNS[name][1])
    return columns


_TIERS = msgspec.json.Decoder(tuple[PriceTier, ...])
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
    cache_write_1h_tokens: int = 0
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


class PeriodSpend(msgspec.Struct, frozen=True, kw_only=True):
    """Spend recorded in the UTC day of ``at`` (``day``) and in its UTC month (``month``)."""

    at: datetime
    day: Decimal
    month: Decimal


class Ledger:
    """The SQLite projection. Open with ``await Ledger.open(path)`` (the writer) or
    ``await Ledger.open_read_only(path)`` (everyone else); close with ``aclose()``."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        last_sequence: int,
        *,
        writer: bool = True,
        path: str | Path = "the ledger",
    ) -> None:
        self._db = db
        self._last = last_sequence
        self._writer = writer
        self._path = path
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Ledger:
        """Open the ledger database at ``path`` for writing, creating it (and its tables) if
        needed. An existing ledger is not written to until the first :meth:`apply_many`, but
        for adding the columns added since once to a file made before them."""
        db = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")  # readers may read as we write
            await db.execute("PRAGMA journal_mode=WAL")  # no write once the file is in WAL
            await db.execute("PRAGMA synchronous=FULL")
            if not await _has_schema(db):
                await db.executescript(_SCHEMA)  # keeps an older spend table, if one is there
            for name in await _missing_columns(db):
                await _add_column(db, name)
            return cls(db, await _read_last(db), path=path)
        except BaseException as exc:
            await db.close()  # its worker thread would keep the process alive
            if isinstance(exc, sqlite3.Error):
                raise _open_error(exc, path) from exc
            raise

    @classmethod
    async def open_read_only(cls, path: str | Path) -> Ledger:
        """Open an existing ledger at ``path`` to read it: nothing is written (the file may be
        read-only) and the writer never waits on this connection. A missing file is a
        :class:`~vapora.errors.ConfigError`."""
        file = anyio.Path(path)
        if not await file.is_file():
            raise ConfigError(f"no ledger at {path}")
        uri = f"{(await file.absolute()).as_uri()}?mode=ro"
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            return cls(db, await _read_last(db), writer=False, path=path)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(exc, path) from exc
            raise

    async def aclose(self) -> None:
        """Close the database connection."""
        await self._db.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def last_sequence(self) -> int:
        """The stream sequence of the last event applied (0 before any); a read-only ledger
        reads what the writer last committed."""
        if self._writer:
            return self._last
        return await _read_last(self._db)

    async def last_row(self) -> tuple[int, str] | None:
        """The stream sequence and id of the last message recorded (an event, or the
        ``unreadable-<seq>`` placeholder of a message that was none), or None before any."""
        return await self._last_of("")

    async def last_event(self) -> tuple[int, str] | None:
        """The stream sequence and id of the last event recorded, or None before any: what a
        restart checks the stream against (the same sequence must hold the same event). A
        message that was no event (recorded as ``unreadable-<seq>``) has no id of its own in the
        stream to check: the last event before it is taken."""
        return await self._last_of(" WHERE event_id != 'unreadable-' || seq")

    async def _last_of(self, where: str) -> tuple[int, str] | None:
        cursor = await self._db.execute(
            f"SELECT seq, event_id FROM events{where} ORDER BY seq DESC LIMIT 1"
        )
        row = await cursor.fetchone()
        await cursor.close()
        return None if row is None else (int(row[0]), str(row[1]))

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

    async def unreadable_sequences(self) -> list[int]:
        """The sequences recorded as messages that were no event (``unreadable-<seq>``)."""
        async with self._reading() as db:
            # (a range of the unique index on event_id: no scan of the table at each start)
            cursor = await db.execute(
                "SELECT seq, event_id FROM events"
                " WHERE event_id >= 'unreadable-' AND event_id < 'unreadable.'"
            )
            found = [seq for seq, eid in await cursor.fetchall() if eid == f"unreadable-{seq}"]
            return sorted(found)

    async def recorded(self, event_ids: Iterable[str]) -> set[str]:
        """Which of ``event_ids`` the ledger has recorded (through the unique index)."""
        found: set[str] = set()
        async with self._reading() as db:
            for event_id in event_ids:
                cursor = await db.execute("SELECT 1 FROM events WHERE event_id = ?", (event_id,))
                if await cursor.fetchone() is not None:
                    found.add(event_id)
        return found

    async def replace_unreadable(self, pairs: list[tuple[Event, int]]) -> int:
        """Record ``(event, seq)`` pairs at sequences recorded as messages that were no event:
        events of a newer writer, read now by a newer ledger than the one that passed them
        by. Each placeholder is replaced by the event's row (and a spend's row), in one
        transaction; the last sequence is unchanged. Returns how many were recorded as events
        (one holding a value SQLite cannot hold stays a placeholder)."""
        pairs = sorted(pairs, key=lambda pair: pair[1])
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany(
                    "DELETE FROM events WHERE seq = ? AND event_id = 'unreadable-' || seq",
                    [(seq,) for _, seq in pairs],
                )
                # (an event holding a value SQLite cannot is written back as a placeholder)
                await self._write(iter(pairs), 0)
                recorded = 0
                for event, seq in pairs:
                    cursor = await self._db.execute(
                        "SELECT event_id FROM events WHERE seq = ?", (seq,)
                    )
                    row = await cursor.fetchone()
                    recorded += row is not None and row[0] == event.id
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
            return recorded

    async def _rollback(self) -> None:
        # The original error matters more than a failed rollback (say, on a closed connection);
        # SQLite discards an uncommitted transaction on close or crash anyway.
        with anyio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error, ValueError):
            await self._db.execute("ROLLBACK")

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        """One read transaction: every query in it sees the same committed state."""
        async with self._lock:  # not inside a batch this connection is writing
            try:
                await self._db.execute("BEGIN")
                try:
                    yield self._db
                finally:
                    await self._rollback()  # it wrote nothing: ending it is all a rollback does
            except sqlite3.Error as exc:
                # A file damaged past the pages opening it read (a page of a table), or held
                # locked past the busy wait: said as opening it would have said it.
                raise _open_error(exc, self._path) from exc

    async def _write(self, pairs: Iterable[tuple[Event, int]], last: int) -> tuple[int, int]:
        applied = 0
        while chunk := list(islice(pairs, _CHUNK)):
            events: list[tuple[Any, ...]] = []
            spends: list[tuple[Any, ...]] = []
            for event, seq in chunk:
                if seq <= last:
                    continue
                last = seq
                row = _event_row(event, seq)
                spend: tuple[Any, ...] = ()
                if type(event) is SpendRecorded:
                    spend = (*_spend_row(event, seq), seq, event.id)
                if not _storable(row) or not _storable(spend):
                    # A value SQLite cannot hold (an integer past 64 bits: the contract bounds
                    # them, an event of an older or foreign writer may not be): recorded as a
                    # message that is no event, as one that does not decode is, not retried
                    # forever (it stopped the ledger, and every restart).
                    log.error(
                        "ledger: the event at sequence %d (%s) holds a value that cannot be "
                        "stored; recorded as unreadable",
                        seq,
                        event_tag(event),
                    )
                    row, spend = (seq, f"unreadable-{seq}", "unreadable", row[3], None), ()
                events.append(row)
                if spend:
                    spends.append(spend)
            cursor = await self._db.executemany(_INSERT_EVENT, events)
            applied += max(cursor.rowcount, 0)
            await self._db.executemany(_INSERT_SPEND, spends)
        return applied, last

    async def spend_rows(self) -> list[SpendRow]:
        """Every spend row, in sequence order."""
        return (await self.snapshot())[0]

    async def logged_events(self) -> list[LoggedEvent]:
        """Every event applied, in sequence order."""
        return (await self.snapshot())[1]

    async def snapshot(
        self, through: int | None = None, *, after: int | None = None
    ) -> tuple[list[SpendRow], list[LoggedEvent]]:
        """The spend rows and the event index, in sequence order, read in one transaction: only
        those at or below sequence ``through`` if given (what the ledger applied after it is not
        there), and only those above ``after`` if given."""
        bounds, params = [], []
        if through is not None:
            bounds.append("seq <= ?")
            params.append(through)
        if after is not None:
            bounds.append("seq > ?")
            params.append(after)
        bound = " WHERE " + " AND ".join(bounds) if bounds else ""
        async with self._reading() as db:
            # Checked in the read: a writer may have added the column since this reader opened.
            columns = _spend_columns(await _missing_columns(db))
            cursor = await db.execute(f"SELECT {columns} FROM spend{bound} ORDER BY seq", params)
            rows = [_read_spend(row) for row in await cursor.fetchall()]
            cursor = await db.execute(
                f"SELECT seq, event_id, type, at, task_id FROM events{bound} ORDER BY seq", params
            )
            logged = [
                LoggedEvent(seq, event_id, type_, _parse(at), task_id)
                for seq, event_id, type_, at, task_id in await cursor.fetchall()
            ]
        return rows, logged

    async def period_spend(self, at: datetime, *, through: int | None = None) -> PeriodSpend:
        """The spend recorded in the UTC day and the UTC month of ``at`` (:func:`period_spend`),
        by the rows at or below sequence ``through`` if given."""
        month_start, month_end = _month_of(at)
        day_start = _utc_midnight(at)
        async with self._reading() as db:  # summed as they are read: no row is kept
            day = await _sum_costs(db, day_start, day_start + timedelta(days=1), through)
            month = await _sum_costs(db, month_start, month_end, through)
        return PeriodSpend(at=at, day=day, month=month)

    async def report(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        now: datetime,
        tail: Sequence[tuple[SpendRecorded, int]] = (),
    ) -> CostReport:
        """The cost report of spend in ``[since, until)`` (see :func:`cost_report`). ``tail``:
        spend events of the log past the ledger's position, with their sequences (an offline
        reader's, when the ledger actor stopped before applying them), counted as the ledger
        would count them: each id once, never one the ledger already has."""
        month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
        sums = ReportSums()
        async with self._reading() as db:  # summed as they are read: no row is kept
            await _sum_window(db, sums, since, until)
            month_to_date = await _sum_costs(db, month_start, None, through_time=now)
            first = await _first_time(db, month_start, now)
            last = await _read_last(db)
            extra = await _unrecorded(db, tail)
        for event in extra:  # compared as the queries compare: the stored text of each time
            at = _iso(event.at)
            if (since is None or at >= _iso(since)) and (until is None or at < _iso(until)):
                sums.add(
                    ((at, event.provider, event.model, event.task_type.value, event.cost_usd),)
                )
            if _iso(month_start) <= at <= _iso(now):
                first = at if first is None else min(first, at)
                with decimal.localcontext(EXACT_SUMS):
                    month_to_date += event.cost_usd
        return sums.report(
            since=since,
            until=until,
            now=now,
            month_to_date=month_to_date,
            month_first=None if first is None else _parse(first),
            last_sequence=max([last, *(seq for _, seq in tail)]),
        )


async def _unrecorded(
    db: aiosqlite.Connection, tail: Sequence[tuple[SpendRecorded, int]]
) -> list[SpendRecorded]:
    """The spends of ``tail`` the ledger has not recorded, each id once."""
    if not tail:
        return []
    ids = list({event.id for event, _ in tail})
    known: set[str] = set()
    for start in range(0, len(ids), 500):  # SQLite's limit on a statement's parameters
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        cursor = await db.execute(f"SELECT event_id FROM events WHERE event_id IN ({marks})", chunk)
        known.update(row[0] for row in await cursor.fetchall())
    fresh: list[SpendRecorded] = []
    for event, _ in tail:
        if event.id not in known:
            known.add(event.id)
            fresh.append(event)
    return fresh


async def _sum_window(
    db: aiosqlite.Connection, sums: ReportSums, since: datetime | None, until: datetime | None
) -> None:
    """Add the spends of ``[since, until)`` to ``sums``, a chunk of rows at a time."""
    clauses, params = [], []
    for clause, bound in (("at >= ?", since), ("at < ?", until)):
        if bound is not None:
            clauses.append(clause)
            params.append(_iso(bound))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    cursor = await db.execute(
        f"SELECT at, provider, model, task_type, cost_usd FROM spend{where}", params
    )
    while rows := await cursor.fetchmany(_READ_CHUNK):
        sums.add(rows)


async def _first_time(db: aiosqlite.Connection, start: datetime, through: datetime) -> str | None:
    """The stored time of the first spend from ``start`` up to and including ``through``."""
    cursor = await db.execute(
        "SELECT MIN(at) FROM spend WHERE at >= ? AND at <= ?", (_iso(start), _iso(through))
    )
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _sum_costs(
    db: aiosqlite.Connection,
    start: datetime,
    end: datetime | None,
    through: int | None = None,
    *,
    through_time: datetime | None = None,
) -> Decimal:
    """The exact sum of the spends from ``start`` to before ``end`` (or up to and including
    ``through_time``), at or below sequence ``through`` if given, a chunk of rows at a time."""
    clauses = ["at >= ?"]
    params: list[object] = [_iso(start)]
    for clause, bound in (("at < ?", end), ("at <= ?", through_time)):
        if bound is not None:
            clauses.append(clause)
            params.append(_iso(bound))
    if through is not None:
        clauses.append("seq <= ?")
        params.append(through)
    cursor = await db.execute(f"SELECT cost_usd FROM spend WHERE {' AND '.join(clauses)}", params)
    total = _ZERO
    with decimal.localcontext(EXACT_SUMS):
        while rows := await cursor.fetchmany(_READ_CHUNK):
            total += sum(Decimal(cost) for (cost,) in rows)
    return total


async def _add_column(db: aiosqlite.Connection, name: str) -> None:
    """Add the column ``name`` (of :data:`_ADDED_COLUMNS`) to an older file's spend table
    (another writer opening it at the same moment may have added it first: then it is there,
    which is all that is wanted)."""
    try:
        await db.execute(f"ALTER TABLE spend ADD COLUMN {name} {_ADDED_COLUMNS[name][0]}")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):
            raise


async def _missing_columns(db: aiosqlite.Connection) -> set[str]:
    """The columns of :data:`_ADDED_COLUMNS` the file's spend table does not have yet."""
    cursor = await db.execute("SELECT name FROM pragma_table_info('spend')")
    have = {name for (name,) in await cursor.fetchall()}
    return set(_ADDED_COLUMNS) - have


async def _has_schema(db: aiosqlite.Connection) -> bool:
    """Whether every table is there and the tracking row too (then opening writes nothing)."""
    cursor = await db.execute("SELECT name FROM sqlite_master")
    names = {name for (name,) in await cursor.fetchall()}
    if not names >= _TABLES:
        return False
    cursor = await db.execute("SELECT 1 FROM tracking WHERE id = 1")
    return await cursor.fetchone() is not None


def _open_error(exc: sqlite3.Error, path: str | Path) -> VaporaError:
    """What opening the ledger failed of, in words the operator can act on."""
    code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_ERROR) & 0xFF  # the primary code
    if code in _BUSY_CODES:
        return RequestTimeout(
            f"the ledger at {path} is busy: another process held its lock for more than "
            f"{_BUSY_MS / 1000:g} s ({exc}); try again (the file itself is fine)"
        )
    if code in _NOT_A_LEDGER_CODES:
        return ConfigError(
            f"{path} is not a ledger this version can read ({exc}); move it aside and "
            "the ledger is rebuilt from the event log"
        )
    return ConfigError(f"cannot open the ledger at {path} ({exc})")


async def _read_last(db: aiosqlite.Connection) -> int:
    cursor = await db.execute("SELECT last_sequence FROM tracking WHERE id = 1")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


_INT64 = range(-(2**63), 2**63)


def _storable(row: tuple[Any, ...]) -> bool:
    """Whether SQLite can hold every value of ``row`` (its integers are 64-bit)."""
    return all(type(value) is not int or value in _INT64 for value in row)


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
        msgspec.json.encode(price.tiers).decode() if price.tiers else None,
        event.cache_write_1h_tokens or 0,
        None if price.cache_write_1h_per_mtok is None else str(price.cache_write_1h_per_mtok),
    )


def _read_spend(row: sqlite3.Row | Sequence[Any]) -> SpendRow:
    (seq, event_id, at, task_id, task_type, provider, model, rid, attempt) = row[:9]
    tokens, cost, prices, (source, version) = row[9:13], row[13], row[14:18], row[18:20]
    tiers = _TIERS.decode(row[20]) if row[20] else ()
    hour_tokens, hour_rate = row[21], row[22]
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
        cache_write_1h_tokens=hour_tokens,
        cost_usd=Decimal(cost),
        price=Price(
            input_per_mtok=Decimal(prices[0]),
            output_per_mtok=Decimal(prices[1]),
            cache_read_per_mtok=Decimal(prices[2]),
            cache_write_per_mtok=Decimal(prices[3]),
            cache_write_1h_per_mtok=None if hour_rate is None else Decimal(hour_rate),
            source=source,
            version=version,
            tiers=tiers,
        ),
    )


def _iso(at: datetime) -> str:
    """``at`` in UTC as the ledger stores times, so that text order is time order (the year
    written with four digits: ``strftime`` writes ``999`` for the year 999). A bound whose UTC
    time falls outside what a datetime holds (``0001-01-01T00:00+01:00``) is the first or the
    last time one holds, on the same side of every stored time."""
    try:
        utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except OverflowError:
        utc = (datetime.min if at.year == 1 else datetime.max).replace(tzinfo=UTC)
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S.%f}Z"


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
    month_first: datetime | None = None,
    last_sequence: int = 0,
) -> CostReport:
    """Totals and breakdowns of ``rows`` (already restricted to the window), the daily average
    over the days observed and the month's projection from ``month_to_date`` (the spend of
    ``now``'s month up to it, the first of it at ``month_first``) at ``now``."""
    sums = ReportSums()
    sums.add(
        (_utc_text(row.at), row.provider, row.model, row.task_type, row.cost_usd) for row in rows
    )
    return sums.report(
        since=since,
        until=until,
        now=now,
        month_to_date=month_to_date,
        month_first=month_first,
        last_sequence=last_sequence,
    )


class ReportSums:
    """A cost report's sums, added to a spend at a time: its memory grows with the groups
    (hour, provider, model, task type), not with the spends. Sums are exact
    (:data:`events.contract.EXACT_SUMS`)."""

    __slots__ = ("calls", "groups")

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str, str], Decimal] = {}
        self.calls = 0

    def add(self, rows: Iterable[Sequence[Any]]) -> None:
        """Add spends given as ``(UTC time as ISO text, provider, model, task type, cost)``;
        the cost a :class:`~decimal.Decimal` or its text (the ledger's stored column)."""
        groups, calls = self.groups, 0
        with decimal.localcontext(EXACT_SUMS):
            for at, provider, model, task_type, cost in rows:
                key = (at[:13], provider, model, task_type)  # "2026-01-31T23": the UTC hour
                spent = groups.get(key)
                groups[key] = Decimal(cost) if spent is None else spent + Decimal(cost)
                calls += 1
        self.calls += calls

    def report(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        now: datetime,
        month_to_date: Decimal,
        month_first: datetime | None = None,
        last_sequence: int = 0,
    ) -> CostReport:
        """The report of the spends added (see the module doc for its figures)."""
        by: dict[str, defaultdict[str, Decimal]] = {
            name: defaultdict(Decimal) for name in ("provider", "model", "task_type", "hour", "day")
        }
        total = _ZERO
        with decimal.localcontext(EXACT_SUMS):
            for (hour, provider, model, task_type), cost in self.groups.items():
                total += cost
                by["provider"][provider] += cost
                by["model"][model] += cost
                by["task_type"][task_type] += cost
                by["hour"][hour + ":00Z"] += cost
                by["day"][hour[:10]] += cost
            days = _days_spanned(by["day"])
            return CostReport(
                since=since,
                until=until,
                total_usd=total,
                calls=self.calls,
                by_provider=_sorted(by["provider"]),
                by_model=_sorted(by["model"]),
                by_task_type=_sorted(by["task_type"]),
                by_hour=_sorted(by["hour"]),
                by_day=_sorted(by["day"]),
                days_observed=days,
                daily_average_usd=_micro(total / days) if days else _ZERO,
                monthly_projection_usd=monthly_projection(month_to_date, now, month_first),
                last_sequence=last_sequence,
            )


def monthly_projection(
    month_to_date: Decimal, now: datetime, first: datetime | None = None
) -> Decimal:
    """This month's spend so far / the days of it observed * days in the month. The days
    observed run from ``first`` (the month's first spend; the 1st when not given) to today, both
    counted whole: a deployment that started spending on the 20th is projected at its own rate,
    not at a third of it."""
    now = now.astimezone(UTC)
    days_in_month = calendar.monthrange(now.year, now.month)[1]
    start = 1
    if first is not None:
        first = first.astimezone(UTC) if first.tzinfo else first.replace(tzinfo=UTC)
        if (first.year, first.month) == (now.year, now.month):
            start = min(first.day, now.day)
    return _micro(month_to_date / (now.day - start + 1) * days_in_month)


def _days_spanned(by_day: dict[str, Decimal]) -> int:
    if not by_day:
        return 0
    first, last = date.fromisoformat(min(by_day)), date.fromisoformat(max(by_day))
    return (last - first).days + 1


def _sorted(groups: dict[str, Decimal]) -> dict[str, Decimal]:
    return dict(sorted(groups.items()))


def _micro(value: Decimal) -> Decimal:
    return value.quantize(_MICRO, rounding=ROUND_HALF_EVEN)


def period_spend(spends: Iterable[tuple[datetime, Decimal]], at: datetime) -> PeriodSpend:
    """Of ``(time, cost)`` pairs, the sums in the UTC day and the UTC month of ``at`` (the budget
    keeper's "spent today" and "spent this month" at ``at``)."""
    day_start = _utc_midnight(at)
    day_end = day_start + timedelta(days=1)
    month_start, month_end = _month_of(at)
    day = month = _ZERO
    with decimal.localcontext(EXACT_SUMS):  # as the keeper's fold sums them
        for when, cost in spends:
            utc = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
            if month_start <= utc < month_end:
                month += cost
                if day_start <= utc < day_end:
                    day += cost
    return PeriodSpend(at=at, day=day, month=month)


def _utc_midnight(at: datetime) -> datetime:
    utc = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_of(at: datetime) -> tuple[datetime, datetime]:
    """The UTC month containing ``at``: its first instant and the next month's."""
    start = _utc_midnight(at).replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end
