"""The SQLite ledger: exactly-once application, atomic batches, crash safety and report math."""

from __future__ import annotations

import sqlite3
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import anyio
import msgspec
import pytest

from events.contract import Price, PriceTier, TaskType
from events.log import BudgetReserved, Event, SpendRecorded
from vapora import ledger as ledger_module
from vapora.errors import ConfigError, RequestTimeout
from vapora.ledger import (
    Ledger,
    PeriodSpend,
    ReportRow,
    cost_report,
    monthly_projection,
    period_spend,
)

pytestmark = pytest.mark.anyio

PRICE = Price(
    input_per_mtok=Decimal("0.075"),
    output_per_mtok=Decimal("0.3"),
    cache_read_per_mtok=Decimal("0.01875"),
    cache_write_per_mtok=Decimal("0"),
    source="genai-prices",
    version="2026-01-15",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spend(
    eid: str,
    at: datetime,
    cost: str,
    provider: str = "claude",
    model: str = "sonnet",
    task_type: TaskType = TaskType.CODE_GENERATION,
) -> SpendRecorded:
    return SpendRecorded(
        id=eid,
        at=at,
        task_id=f"task-{eid}",
        task_type=task_type,
        provider=provider,
        model=model,
        input_tokens=1200,
        output_tokens=300,
        cache_read_tokens=200,
        cost_usd=Decimal(cost),
        price=PRICE,
        reservation_id=f"res-{eid}",
        attempt=2,
    )


def hold(eid: str, at: datetime) -> BudgetReserved:
    return BudgetReserved(
        id=eid,
        at=at,
        task_id="t",
        reservation_id=f"res-{eid}",
        provider="claude",
        amount_usd=Decimal("0.5"),
        expires_at=at + timedelta(minutes=2),
    )


T = datetime(2026, 1, 30, 10, 15, tzinfo=UTC)


def numbered(events: list[Event], start: int = 1) -> list[tuple[Event, int]]:
    return [(event, seq) for seq, event in enumerate(events, start=start)]


def many(n: int) -> list[Event]:
    return [spend(f"e{i}", T + timedelta(seconds=i), "0.001") for i in range(n)]


async def test_applying_the_same_event_twice_counts_it_once(tmp_path: Path):
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        event = spend("e1", T, "0.25")
        assert await ledger.apply(event, 1)
        assert not await ledger.apply(event, 1)  # redelivered under the same sequence
        assert not await ledger.apply(event, 2)  # appended again, beyond the dedup window
        assert [row.event_id for row in await ledger.spend_rows()] == ["e1"]
        assert await ledger.last_sequence() == 2
        report = await ledger.report(now=T)
        assert (report.total_usd, report.calls) == (Decimal("0.25"), 1)


async def test_a_spend_row_keeps_every_figure_exactly(tmp_path: Path):
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered([hold("h1", T), spend("e1", T, "0.000000075")]))
        (row,) = await ledger.spend_rows()
        logged = await ledger.logged_events()
    assert (row.seq, row.event_id, row.task_id, row.provider, row.model) == (
        2,
        "e1",
        "task-e1",
        "claude",
        "sonnet",
    )
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens, row.attempt) == (
        1200,
        300,
        200,
        2,
    )
    assert row.cost_usd == Decimal("0.000000075") and str(row.cost_usd) == "7.5E-8"
    assert row.price == PRICE and row.at == T and row.reservation_id == "res-e1"
    assert [(e.seq, e.event_id, e.type) for e in logged] == [
        (1, "h1", "budget_reserved"),
        (2, "e1", "spend_recorded"),
    ]


async def test_a_reopened_ledger_resumes_after_its_last_sequence(tmp_path: Path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        assert await ledger.apply_many(numbered(many(1200))) == 1200
    async with await Ledger.open(path) as ledger:
        assert await ledger.last_sequence() == 1200
        assert await ledger.apply_many(numbered(many(1300))) == 100  # overlapping catch-up
        assert len(await ledger.spend_rows()) == 1300


async def test_a_batch_failing_midway_leaves_no_partial_row_and_the_sequence_unchanged(
    tmp_path: Path,
):
    def crashing() -> Iterator[tuple[Event, int]]:
        yield from numbered(many(1100), start=11)  # more than one chunk is written first
        raise RuntimeError("consumer died mid-batch")

    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered([hold(f"h{i}", T) for i in range(10)]))
        with pytest.raises(RuntimeError, match="mid-batch"):
            await ledger.apply_many(crashing())
        assert await ledger.last_sequence() == 10
        assert await ledger.spend_rows() == []
        assert len(await ledger.logged_events()) == 10
        # The redelivered batch then applies in full.
        assert await ledger.apply_many(numbered(many(1100), start=11)) == 1100
        assert await ledger.last_sequence() == 1110


async def test_a_process_killed_mid_transaction_leaves_nothing_partial(tmp_path: Path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(numbered(many(5)))
    script = textwrap.dedent(
        f"""
        import os, anyio
        from tests.unit.test_ledger import many, numbered
        from vapora.ledger import Ledger

        def dying():
            yield from numbered(many(1200), start=6)
            os._exit(9)  # SIGKILL-like: no rollback, no close, no atexit

        async def main():
            ledger = await Ledger.open({str(path)!r})
            await ledger.apply_many(dying())

        anyio.run(main)
        """
    )
    done = await anyio.run_process(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False
    )
    assert done.returncode == 9
    async with await Ledger.open(path) as ledger:
        assert await ledger.last_sequence() == 5
        assert len(await ledger.spend_rows()) == 5
        assert await ledger.apply_many(numbered(many(1205))) == 1200


async def test_money_is_stored_as_text_never_real(tmp_path: Path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply(spend("e1", T, "0.1"), 1)
    with sqlite3.connect(path) as db:
        kinds = db.execute("SELECT typeof(cost_usd), typeof(input_per_mtok) FROM spend").fetchone()
    assert kinds == ("text", "text")


# --- readers, the writer's lock, and what an open writes ----------------------------------------


async def test_opening_an_existing_ledger_takes_no_lock_so_a_held_write_lock_stops_no_reader(
    tmp_path: Path,
):
    """Every open ran the schema script (an INSERT): it waited 5 s for a lock another process
    held (a batch being committed, a backup) and then called the ledger corrupt."""
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(numbered(many(3)))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock, held for the whole test
        async with await Ledger.open_read_only(path) as reader:
            assert await reader.last_sequence() == 3
            assert [row.event_id for row in await reader.spend_rows()] == ["e0", "e1", "e2"]
        async with await Ledger.open(path) as writer:  # the writer's open writes nothing either
            assert await writer.last_sequence() == 3
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_a_lock_held_past_the_busy_wait_says_the_ledger_is_busy_not_that_it_is_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ledger_module, "_BUSY_MS", 100, raising=False)
    fresh = tmp_path / "fresh.db"  # a new ledger's tables must be written: the writer waits
    other = sqlite3.connect(fresh, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RequestTimeout, match="is busy") as raised:
            await Ledger.open(fresh)
        assert "move it aside" not in str(raised.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(numbered(many(2)))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=DELETE")  # without WAL a writer's commit blocks readers
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RequestTimeout, match="is busy"):
            await Ledger.open_read_only(path)
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_a_file_damaged_past_its_first_pages_is_said_to_be_no_ledger_on_reading(
    tmp_path: Path,
):
    """Opening reads the tracking table only: a file damaged in the spend table's pages opened,
    and the first report raised sqlite3's DatabaseError (a traceback from `vapora report
    --data-dir` and `vapora audit --data-dir`, "internal error" from the ledger actor)."""
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(numbered(REPORT_EVENTS))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'spend'")
        [(page,)] = db.execute("PRAGMA page_size")
    with path.open("r+b") as file:  # the spend table's root page overwritten
        file.seek((root - 1) * page)
        file.write(b"\xff" * page)
    for opened in (Ledger.open_read_only, Ledger.open):
        async with await opened(path) as ledger:
            with pytest.raises(ConfigError, match="is not a ledger this version can read") as e:
                await ledger.report(now=NOW)
            assert str(path) in str(e.value) and "move it aside" in str(e.value)
            with pytest.raises(ConfigError, match="is not a ledger this version can read"):
                await ledger.snapshot()


async def test_a_reader_needs_the_file_and_never_writes_it(tmp_path: Path):
    missing = tmp_path / "none.db"
    with pytest.raises(ConfigError, match="no ledger at"):
        await Ledger.open_read_only(missing)
    assert not missing.exists()  # not created empty
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(numbered(many(2)))
    async with await Ledger.open_read_only(path) as reader:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await reader.apply(spend("e9", T, "1"), 9)
    async with await Ledger.open_read_only(path) as reader:
        assert len(await reader.spend_rows()) == 2 and await reader.last_sequence() == 2


async def test_a_file_that_is_no_ledger_is_named_by_readers_too(tmp_path: Path):
    path = tmp_path / "ledger.db"
    path.write_bytes(b"garbage " * 1000)
    with pytest.raises(ConfigError, match=r"not a ledger this version can read.*move it aside"):
        await Ledger.open_read_only(path)
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()  # an SQLite file, but without the ledger's tables
    with pytest.raises(ConfigError, match="not a ledger this version can read"):
        await Ledger.open_read_only(other)


async def test_a_reader_sees_what_the_writer_commits_after_it_opened(tmp_path: Path):
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as writer, await Ledger.open_read_only(path) as reader:
        assert await reader.last_sequence() == 0
        await writer.apply_many(numbered(many(4)))
        assert await reader.last_sequence() == 4
        assert len(await reader.spend_rows()) == 4


async def test_a_snapshot_through_a_sequence_leaves_out_what_was_applied_after_it(tmp_path: Path):
    events: list[Event] = [spend("e1", T, "0.1"), hold("h2", T), spend("e3", T, "0.2")]
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(events))
        rows, logged = await ledger.snapshot(through=2)
        all_rows, all_logged = await ledger.snapshot()
    assert [r.event_id for r in rows] == ["e1"] and [e.event_id for e in logged] == ["e1", "h2"]
    assert len(all_rows) == 2 and len(all_logged) == 3


async def test_the_spend_of_a_day_and_its_month_is_summed_in_utc(tmp_path: Path):
    events: list[Event] = [
        spend("jan31", datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), "1"),
        spend("feb1", datetime(2026, 2, 1, 0, 0, tzinfo=UTC), "0.000000075"),
        spend("feb1b", datetime(2026, 2, 1, 23, 59, tzinfo=UTC), "0.25"),
        spend("feb2", datetime(2026, 2, 2, 0, 0, tzinfo=UTC), "0.5"),
        spend("mar1", datetime(2026, 3, 1, 0, 0, tzinfo=UTC), "4"),
    ]
    at = datetime(2026, 2, 1, 12, tzinfo=UTC)
    expected = PeriodSpend(at=at, day=Decimal("0.250000075"), month=Decimal("0.750000075"))
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(events))
        assert await ledger.period_spend(at) == expected
    pairs = [(e.at, e.cost_usd) for e in events if isinstance(e, SpendRecorded)]
    assert period_spend(pairs, at) == expected
    tokyo = at.astimezone(timezone(timedelta(hours=9)))  # the same instant, another zone
    assert period_spend(pairs, tokyo).day == expected.day


# --- report math ---------------------------------------------------------------------------------

REPORT_EVENTS: list[Event] = [
    spend("e1", datetime(2026, 1, 30, 10, 15, tzinfo=UTC), "1.50"),
    spend(
        "e2",
        datetime(2026, 1, 30, 10, 45, tzinfo=UTC),
        "0.25",
        "openai",
        "gpt",
        TaskType.GENERAL_QUERY,
    ),
    spend(
        "e3", datetime(2026, 1, 30, 11, 5, tzinfo=UTC), "0.000003", task_type=TaskType.CODE_REVIEW
    ),
    spend(
        "e4", datetime(2026, 2, 1, 9, tzinfo=UTC), "2.00", "gemini", "flash", TaskType.GENERAL_QUERY
    ),
    spend("e5", datetime(2026, 2, 3, 23, 59, 59, tzinfo=UTC), "0.75", model="haiku"),
    hold("h1", datetime(2026, 2, 3, 12, tzinfo=UTC)),
]
NOW = datetime(2026, 2, 4, 12, tzinfo=UTC)


async def test_the_report_matches_hand_computed_figures(tmp_path: Path):
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(REPORT_EVENTS))
        report = await ledger.report(now=NOW)
    assert report.total_usd == Decimal("4.500003") and report.calls == 5
    assert report.by_provider == {
        "claude": Decimal("2.250003"),
        "gemini": Decimal("2.00"),
        "openai": Decimal("0.25"),
    }
    assert report.by_model == {
        "flash": Decimal("2.00"),
        "gpt": Decimal("0.25"),
        "haiku": Decimal("0.75"),
        "sonnet": Decimal("1.500003"),
    }
    assert report.by_task_type == {
        "CodeGeneration": Decimal("2.25"),
        "CodeReview": Decimal("0.000003"),
        "GeneralQuery": Decimal("2.25"),
    }
    assert report.by_day == {
        "2026-01-30": Decimal("1.750003"),
        "2026-02-01": Decimal("2.00"),
        "2026-02-03": Decimal("0.75"),
    }
    assert report.by_hour["2026-01-30T10:00Z"] == Decimal("1.75")
    assert report.by_hour["2026-02-03T23:00Z"] == Decimal("0.75")
    assert len(report.by_hour) == 4
    # Jan 30 .. Feb 3 is 5 observed days (not 24, not 3): 4.500003 / 5 = 0.9000006 -> 0.900001.
    assert report.days_observed == 5
    assert report.daily_average_usd == Decimal("0.900001")
    # February so far: 2.75 over 4 elapsed days, 28 days in February 2026 -> 19.25.
    assert report.monthly_projection_usd == Decimal("19.25")
    assert report.last_sequence == 6


async def test_the_report_window_is_half_open(tmp_path: Path):
    since = datetime(2026, 1, 30, 11, tzinfo=UTC)
    until = datetime(2026, 2, 3, 23, 59, 59, tzinfo=UTC)  # e5 is exactly at `until`: excluded
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(REPORT_EVENTS))
        report = await ledger.report(since, until, now=NOW)
    assert (report.total_usd, report.calls) == (Decimal("2.000003"), 2)
    assert (report.since, report.until) == (since, until)
    assert report.days_observed == 3  # Jan 30, Jan 31 (idle), Feb 1
    assert report.daily_average_usd == Decimal("0.666668")
    assert report.monthly_projection_usd == Decimal("19.25")  # the run rate ignores the window


@pytest.mark.parametrize(
    ("since", "until", "counted"),
    [
        # strftime wrote the year 999 as "999-...", which sorts after "2026-...".
        (datetime(999, 1, 1, tzinfo=UTC), None, True),
        (None, datetime(999, 1, 1, tzinfo=UTC), False),
        # Bounds whose UTC time is outside what a datetime holds: an OverflowError before.
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), None, True),
        (None, datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))), True),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))), None, False),
    ],
)
async def test_window_bounds_far_in_the_past_or_future_compare_as_times(
    tmp_path: Path, since: datetime | None, until: datetime | None, counted: bool
):
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(REPORT_EVENTS))
        everything = await ledger.report(now=NOW)
        report = await ledger.report(since, until, now=NOW)
    assert report.calls == (everything.calls if counted else 0)
    assert report.total_usd == (everything.total_usd if counted else 0)


async def test_a_report_keeps_sums_not_rows_so_a_large_window_needs_little_memory(
    tmp_path: Path,
):
    # A month of a busy deployment is millions of rows; the report held every one of them as
    # an object (1.1 GB for a million), so one `vapora.report` could take the ledger down.
    n = 40_000
    base = datetime(2026, 2, 1, tzinfo=UTC)
    events = [spend(f"m{i}", base + timedelta(seconds=i), "0.000001") for i in range(n)]
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(events))
        peaks = []
        for read in (
            lambda: ledger.report(now=base + timedelta(days=1)),
            lambda: ledger.period_spend(base),
        ):
            tracemalloc.start()
            try:
                result = await read()
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            if isinstance(result, PeriodSpend):
                assert result.day == result.month == Decimal("0.040000")
            else:
                assert (result.calls, result.total_usd) == (n, Decimal("0.040000"))
                assert result.by_hour["2026-02-01T10:00Z"] == Decimal("0.003600")
        assert await ledger.period_spend(base, through=n // 2) == PeriodSpend(
            at=base, day=Decimal("0.020000"), month=Decimal("0.020000")
        )
    # About 41 MB and 7.7 MB when every row was kept; a chunk of rows at a time now.
    assert peaks[0] < 10_000_000, peaks
    assert peaks[1] < 2_000_000, peaks


def test_an_empty_report_is_all_zero():
    report = cost_report([], since=None, until=None, now=NOW, month_to_date=Decimal(0))
    assert (report.total_usd, report.calls, report.days_observed) == (0, 0, 0)
    assert report.daily_average_usd == 0 and report.monthly_projection_usd == 0


def test_the_monthly_projection_is_the_run_rate_of_the_current_month():
    assert monthly_projection(Decimal(10), datetime(2026, 1, 1, 0, 5, tzinfo=UTC)) == 310
    assert monthly_projection(Decimal(10), datetime(2026, 1, 31, 23, tzinfo=UTC)) == 10
    assert monthly_projection(Decimal(3), datetime(2028, 2, 2, tzinfo=UTC)) == Decimal("43.5")


def test_the_monthly_projection_counts_the_days_from_the_months_first_spend():
    # DESIGN §6.4: from the actual days observed. A deployment that started spending on the
    # 21st was projected over all 31 days, at about a third of its rate.
    now = datetime(2026, 1, 31, 23, tzinfo=UTC)
    assert monthly_projection(Decimal(11), now, datetime(2026, 1, 21, 8, tzinfo=UTC)) == 31
    assert monthly_projection(Decimal(11), now, datetime(2026, 1, 31, 22, tzinfo=UTC)) == 341
    # A first spend in another month, or after now (a clock ahead): the month's own days.
    assert monthly_projection(Decimal(31), now, datetime(2025, 12, 30, tzinfo=UTC)) == 31
    assert monthly_projection(Decimal(1), now, datetime(2026, 2, 1, 1, tzinfo=UTC)) == 1


async def test_the_ledgers_projection_starts_at_its_first_spend_of_the_month(tmp_path: Path):
    events = [
        spend("dec", datetime(2025, 12, 31, 12, tzinfo=UTC), "50"),  # last month: not counted
        spend("j21", datetime(2026, 1, 21, 9, tzinfo=UTC), "5"),
        spend("j25", datetime(2026, 1, 25, 9, tzinfo=UTC), "6"),
    ]
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered(events))
        report = await ledger.report(now=datetime(2026, 1, 31, 23, tzinfo=UTC))
    # $11 over the 11 days from the 21st to the 31st, for 31 days (before: $11 / 31 * 31).
    assert report.monthly_projection_usd == 31


def test_report_rows_are_grouped_by_their_utc_hour():
    paris = datetime(2026, 2, 1, 0, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=1)))
    row = ReportRow(paris, "p", "m", "GeneralQuery", Decimal(1))
    report = cost_report([row], since=None, until=None, now=NOW, month_to_date=Decimal(0))
    assert list(report.by_hour) == ["2026-02-01T00:00Z"] and list(report.by_day) == ["2026-02-01"]


TIERED = msgspec.structs.replace(
    PRICE,
    tiers=(
        PriceTier(
            above_input_tokens=200_000,
            input_per_mtok=Decimal("0.15"),
            output_per_mtok=Decimal("0.6"),
            cache_read_per_mtok=Decimal("0.0375"),
            cache_write_per_mtok=Decimal("0"),
        ),
    ),
)


async def test_a_spends_long_context_tiers_are_kept_with_its_row(tmp_path: Path):
    """The ledger stored the four flat rates only: every spend on a tiered model differed from
    its event in the audit's row comparison."""
    event = msgspec.structs.replace(spend("e1", T, "0.5"), price=TIERED)
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        await ledger.apply_many(numbered([event, spend("e2", T, "0.1")]))
        tiered, flat = await ledger.spend_rows()
    assert tiered.price == TIERED and flat.price == PRICE


_OLD_SPEND_TABLE = """
CREATE TABLE tracking (id INTEGER PRIMARY KEY CHECK (id = 1), last_sequence INTEGER NOT NULL);
INSERT INTO tracking (id, last_sequence) VALUES (1, 1);
CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    at TEXT NOT NULL, task_id TEXT);
CREATE TABLE spend (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, at TEXT NOT NULL,
    task_id TEXT NOT NULL, task_type TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
    reservation_id TEXT, attempt INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL, cost_usd TEXT NOT NULL, input_per_mtok TEXT NOT NULL,
    output_per_mtok TEXT NOT NULL, cache_read_per_mtok TEXT NOT NULL,
    cache_write_per_mtok TEXT NOT NULL, price_source TEXT NOT NULL, price_version TEXT NOT NULL);
CREATE INDEX spend_at ON spend (at);
INSERT INTO events VALUES (1, 'e0', 'spend_recorded', '2026-03-31T23:59:58.123456+00:00', 't');
INSERT INTO spend VALUES (1, 'e0', '2026-03-31T23:59:58.123456+00:00', 't', 'CodeGeneration',
    'claude', 'sonnet', NULL, 1, 10, 5, 0, 0, '0.01', '0.075', '0.3', '0.01875', '0',
    'genai-prices', '2026-01-15');
"""


async def test_a_ledger_made_before_the_tiers_column_is_read_and_then_migrated(tmp_path: Path):
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SPEND_TABLE)
    old.close()
    async with await Ledger.open_read_only(path) as reader:  # read as it is, not changed
        (row,) = await reader.spend_rows()
    assert row.price == PRICE
    async with await Ledger.open(path) as writer:  # the writer adds the column
        await writer.apply_many([(msgspec.structs.replace(spend("e1", T, "0.5"), price=TIERED), 2)])
        first, second = await writer.spend_rows()
    assert first.price == PRICE and second.price == TIERED


async def test_hour_long_cache_writes_and_their_rate_are_kept_in_old_and_new_files(
    tmp_path: Path,
):
    """Anthropic's hour-long cache writes were billed (and stored) as five-minute writes. The
    ledger keeps their count and rate; a file made before those columns is read as having none
    and given them by the writer."""
    hourly = msgspec.structs.replace(
        spend("e1", T, "0.5"),
        cache_write_tokens=30,
        cache_write_1h_tokens=20,
        price=msgspec.structs.replace(PRICE, cache_write_1h_per_mtok=Decimal("0.6")),
    )
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SPEND_TABLE)
    old.close()
    async with await Ledger.open_read_only(path) as reader:
        (row,) = await reader.spend_rows()
    assert row.cache_write_1h_tokens == 0 and row.price.cache_write_1h_per_mtok is None
    async with await Ledger.open(path) as writer:
        await writer.apply_many([(hourly, 2)])
        _, row = await writer.spend_rows()
    assert (row.cache_write_tokens, row.cache_write_1h_tokens) == (30, 20)
    assert row.price == hourly.price
    async with await Ledger.open(tmp_path / "new.db") as writer:
        await writer.apply_many([(hourly, 1)])
        (row,) = await writer.spend_rows()
    assert row.cache_write_1h_tokens == 20 and row.price == hourly.price


async def test_the_tiers_column_is_added_whatever_state_the_older_file_is_in(tmp_path: Path):
    """Two writers opening an older file at once: the second failed on the column the first had
    just added, and was told its file was no ledger. A file with tables but no tracking row was
    never given the column. A reader opened before the column was added read tiered rows flat."""
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SPEND_TABLE.replace("INSERT INTO tracking", "-- no tracking row\n--"))
    old.close()
    reader = await Ledger.open_read_only(path)  # before any writer
    try:
        first = await Ledger.open(path)
        await first.aclose()
        ledger_module_again = await Ledger.open(path)  # the column is there already: fine
        async with ledger_module_again as writer:
            await writer.apply_many(
                [(msgspec.structs.replace(spend("e1", T, "0.5"), price=TIERED), 2)]
            )
        rows = await reader.spend_rows()
    finally:
        await reader.aclose()
    assert [row.price for row in rows] == [PRICE, TIERED]


async def test_a_column_added_by_another_writer_meanwhile_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SPEND_TABLE)
    old.close()
    async with await Ledger.open(path):  # the first writer adds the column
        pass

    async def checked_before_it_was_added(db: object) -> set[str]:
        return set(ledger_module._ADDED_COLUMNS)

    monkeypatch.setattr(ledger_module, "_missing_columns", checked_before_it_was_added)
    async with await Ledger.open(path) as second:  # its ALTER finds the column: no error
        assert await second.last_sequence() == 1


async def test_an_event_holding_a_value_sqlite_cannot_hold_is_unreadable_not_a_stall(
    tmp_path: Path,
):
    """A ``spend_recorded`` whose ``attempt`` was 10**30 (any client could have a provider actor
    write one) could not be stored: the ledger retried it every half second, forever, no later
    spend reached the report, and every restart died on it. It is recorded as a message that
    is no event, and what follows it is applied."""
    import msgspec

    huge = msgspec.structs.replace(spend("e1", T, "0.25"), attempt=10**30)
    async with await Ledger.open(tmp_path / "ledger.db") as ledger:
        applied = await ledger.apply_many(numbered([huge, spend("e2", T, "0.5")]))
        assert applied == 2 and await ledger.last_sequence() == 2
        assert [row.event_id for row in await ledger.spend_rows()] == ["e2"]
        assert await ledger.last_event() == (2, "e2")
        assert [e.event_id for e in await ledger.logged_events()] == ["unreadable-1", "e2"]
