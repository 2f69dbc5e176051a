"""The audit: a clean run passes; altered rows, mispriced events and a drifted keeper are named."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from events.contract import Price, TaskType, Usage
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    CallSucceeded,
    Event,
    SpendRecorded,
)
from vapora import budget
from vapora.audit import (
    audit,
    check_budget,
    check_costs,
    check_keeper_spend,
    check_ledger,
    recompute_cost,
    render_audit,
    render_report,
)
from vapora.budget import BudgetLimits
from vapora.ledger import Ledger, PeriodSpend
from vapora.pricing import cost

T = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
SONNET = Price(
    input_per_mtok=Decimal(3),
    output_per_mtok=Decimal(15),
    cache_read_per_mtok=Decimal("0.30"),
    cache_write_per_mtok=Decimal("3.75"),
    source="genai-prices",
    version="2026-03-01",
)
FLASH = Price(
    input_per_mtok=Decimal("0.075"),
    output_per_mtok=Decimal("0.30"),
    cache_read_per_mtok=Decimal("0.01875"),
    cache_write_per_mtok=Decimal(0),
    source="config",
    version="1",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spend(i: int, price: Price, tokens: tuple[int, int, int, int], at: datetime) -> SpendRecorded:
    usage = Usage(
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
    )
    return SpendRecorded(
        id=f"spend-{i}",
        at=at,
        task_id=f"task-{i % 3}",
        task_type=TaskType.CODE_GENERATION if i % 2 else TaskType.GENERAL_QUERY,
        provider="claude" if price is SONNET else "gemini",
        model="claude-sonnet-4" if price is SONNET else "gemini-flash",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cost_usd=cost(usage, price),
        price=price,
        reservation_id=f"res-{i}",
    )


def clean_log() -> list[tuple[Event, int]]:
    events: list[Event] = []
    for i in range(8):
        at = T + timedelta(minutes=17 * i)  # crosses midnight into April
        price = SONNET if i % 3 else FLASH
        events.append(
            BudgetReserved(
                id=f"hold-{i}",
                at=at,
                task_id=f"task-{i % 3}",
                reservation_id=f"res-{i}",
                provider="claude",
                amount_usd=Decimal(1),
                expires_at=at + timedelta(minutes=2),
            )
        )
        if i == 5:
            events.append(
                BudgetReleased(
                    id="release-5", at=at, task_id="task-2", reservation_id="res-5", reason="failed"
                )
            )
            continue
        events.append(spend(i, price, (1000 + 137 * i, 50 * i + 1, 100 * (i % 2), 7 * i), at))
        events.append(
            CallSucceeded(
                id=f"ok-{i}",
                at=at,
                task_id=f"task-{i % 3}",
                provider="claude",
                model="m",
                attempt=1,
                usage=Usage(),
                cost_usd=Decimal(0),
                latency_ms=12.0,
            )
        )
    events.append(events[4])  # a duplicate append (same id) further down the log
    return [(event, seq) for seq, event in enumerate(events, start=1)]


async def ledger_of(tmp_path: Path, log: list[tuple[Event, int]]) -> Path:
    path = tmp_path / "ledger.db"
    async with await Ledger.open(path) as ledger:
        await ledger.apply_many(log)
    return path


async def audit_of(path: Path, log: list[tuple[Event, int]], **kw: object):
    async with await Ledger.open(path) as ledger:
        rows, logged = await ledger.spend_rows(), await ledger.logged_events()
    return audit(log, rows, logged, **kw)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_clean_run_passes(tmp_path: Path):
    log = clean_log()
    path = await ledger_of(tmp_path, log)
    keeper = budget.catch_up(budget.EMPTY, log)
    result = await audit_of(path, log, keeper=keeper)
    assert result.ok, render_audit(result)
    assert (result.spends_checked, result.rows_checked, result.last_sequence) == (7, 7, len(log))
    assert "no differences" in render_audit(result)


@pytest.mark.anyio
async def test_a_ledger_row_altered_by_hand_is_named(tmp_path: Path):
    log = clean_log()
    path = await ledger_of(tmp_path, log)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE spend SET cost_usd = '0.5' WHERE event_id = 'spend-3'")
    result = await audit_of(path, log)
    assert not result.ok
    (row,) = [d for d in result.discrepancies if d.where.startswith("ledger row")]
    seq = next(s for e, s in log if e.id == "spend-3")
    assert row.where == f"ledger row seq {seq}: cost_usd" and row.event_id == "spend-3"
    assert row.found == "$0.50"
    assert any(d.where == "ledger total" for d in result.discrepancies)
    text = render_audit(result)
    assert "spend-3" in text and f"ledger row seq {seq}" in text and "difference" in text


@pytest.mark.anyio
async def test_missing_and_extra_ledger_rows_and_index_entries_are_named(tmp_path: Path):
    log = clean_log()
    path = await ledger_of(tmp_path, log)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM spend WHERE event_id = 'spend-1'")
        db.execute("DELETE FROM events WHERE event_id = 'hold-2'")
        db.execute("UPDATE spend SET event_id = 'ghost', seq = 999 WHERE event_id = 'spend-6'")
    found = {(d.where.split(":")[0], d.event_id) for d in (await audit_of(path, log)).discrepancies}
    assert ("ledger", "spend-1") in found  # "ledger: spend_recorded seq N" - no row
    assert ("ledger row seq 999", "ghost") in found
    assert ("ledger", "spend-6") in found
    assert ("ledger event index", "hold-2") in found


def test_a_spend_event_whose_cost_does_not_match_its_usage_and_prices_is_named():
    log = clean_log()
    event, seq = next((e, s) for e, s in log if e.id == "spend-2")
    assert isinstance(event, SpendRecorded)
    wrong = msgspec.structs.replace(event, cost_usd=event.cost_usd + Decimal("0.000001"))
    log[seq - 1] = (wrong, seq)
    (found,) = check_costs(log)
    assert found.event_id == "spend-2" and f"seq {seq}" in found.where
    assert found.expected == f"${recompute_cost(event)}"
    assert "genai-prices@2026-03-01" in found.where


def test_the_recomputation_counts_cache_tokens_inside_input_tokens():
    event = spend(1, SONNET, (1000, 100, 200, 100), T)
    # 700 uncached x $3 + 200 x $0.30 + 100 x $3.75 + 100 x $15, per million tokens.
    assert recompute_cost(event) == Decimal("0.004035")


def test_the_ledger_check_compares_totals_per_provider_model_task_type_and_day():
    log = clean_log()
    assert check_ledger(log, []) != []
    kinds = {d.where for d in check_ledger(log, [])}
    assert "ledger total by provider claude" in kinds
    assert "ledger total by day 2026-04-01" in kinds and "ledger total by day 2026-03-31" in kinds


def test_a_keeper_that_drifted_from_the_log_is_named():
    log = clean_log()
    honest = budget.catch_up(budget.EMPTY, log)
    assert check_budget(log, honest) == []
    skipped = [(e, s) for e, s in log if e.id != "spend-7"]
    drifted = budget.catch_up(budget.EMPTY, skipped)
    where = {d.where for d in check_budget(log, drifted)}
    assert {"budget keeper total spent", "budget keeper spent on 2026-04-01"} <= where


def test_a_keeper_status_is_compared_at_its_own_time():
    log, limits = clean_log(), BudgetLimits.from_cents(daily_cents=100)
    now = T + timedelta(hours=3)
    status = budget.status(budget.catch_up(budget.EMPTY, log), limits, now)
    assert check_budget(log, status, limits) == []
    lying = msgspec.structs.replace(status, spent_today_usd=Decimal(0), open_reservations=2)
    where = {d.where for d in check_budget(log, lying, limits)}
    assert where == {"budget keeper spent today", "budget keeper open reservations"}


@pytest.mark.anyio
async def test_a_duplicate_the_keeper_counted_again_after_forgetting_it_is_found_in_the_ledger(
    tmp_path: Path,
):
    """The fold forgets the spend ids it counted a day (of event time) after them, so the same
    event appended again later is counted twice, by the keeper and by the audit's own replay
    alike: comparing the two found nothing. The ledger counts it once."""
    first = spend(1, SONNET, (1000, 100, 0, 0), datetime(2026, 4, 1, 12, tzinfo=UTC))
    later = [  # hourly, for three days: event time moves on an hour at a time
        spend(10 + h, SONNET, (2000, 0, 0, 0), first.at + timedelta(hours=h)) for h in range(1, 73)
    ]
    log: list[tuple[Event, int]] = [
        (event, seq) for seq, event in enumerate([first, *later, first], start=1)
    ]
    once = first.cost_usd + sum((s.cost_usd for s in later), Decimal(0))
    limits = BudgetLimits.from_cents(daily_cents=1000)
    state = budget.catch_up(budget.EMPTY, log)
    path = await ledger_of(tmp_path, log)

    status = budget.status(state, limits, datetime(2026, 4, 4, 13, tzinfo=UTC))
    assert status.spent_month_usd == once + first.cost_usd  # counted twice by the keeper
    assert check_budget(log, status, limits) == []  # and by the replay: no difference there
    result = await audit_of(path, log, keeper=status, limits=limits)
    (found,) = result.discrepancies
    assert found.where == "budget keeper spent this month vs the ledger's rows"
    assert (found.expected, found.found) == ("$0.4365", "$0.441")  # once, and twice the first

    on_the_day = budget.status(state, limits, datetime(2026, 4, 1, 13, tzinfo=UTC))
    result = await audit_of(path, log, keeper=on_the_day, limits=limits)
    assert {d.where for d in result.discrepancies} == {
        "budget keeper spent today vs the ledger's rows",
        "budget keeper spent this month vs the ledger's rows",
    }
    honest = budget.status(budget.catch_up(budget.EMPTY, log[:-1]), limits, on_the_day.at)
    assert (await audit_of(path, log[:-1], keeper=honest, limits=limits)).ok


def test_spend_recorded_between_the_two_ledger_reads_is_no_difference_with_the_keeper():
    at = T + timedelta(hours=3)
    base = budget.status(budget.EMPTY, BudgetLimits(), at)
    before = PeriodSpend(at=at, day=Decimal("1"), month=Decimal("3"))
    after = PeriodSpend(at=at, day=Decimal("1.5"), month=Decimal("3.5"))
    between = msgspec.structs.replace(
        base, spent_today_usd=Decimal("1.2"), spent_month_usd=Decimal("3.5")
    )
    assert check_keeper_spend(between, before, after) == []
    exact = check_keeper_spend(between, before)  # one read: the figures must be equal
    assert [(d.where, d.expected, d.found) for d in exact] == [
        ("budget keeper spent today vs the ledger's rows", "$1.00", "$1.20"),
        ("budget keeper spent this month vs the ledger's rows", "$3.00", "$3.50"),
    ]
    beyond = msgspec.structs.replace(between, spent_today_usd=Decimal("1.6"))
    (found,) = check_keeper_spend(beyond, before, after)
    assert (found.expected, found.found) == ("$1.00 to $1.50", "$1.60")
    short = msgspec.structs.replace(between, spent_month_usd=Decimal("2.9"))
    (found,) = check_keeper_spend(short, before, after)
    assert found.where == "budget keeper spent this month vs the ledger's rows"


@pytest.mark.anyio
async def test_the_report_renders_as_a_readable_table(tmp_path: Path):
    path = await ledger_of(tmp_path, clean_log())
    async with await Ledger.open(path) as ledger:
        report = await ledger.report(now=T + timedelta(days=1))
    text = render_report(report)
    assert f"${report.total_usd.normalize():f}" in text
    assert "By provider" in text and "claude" in text and "gemini" in text
    assert "2026-03-31" in text and "2026-04-01" in text
    assert "over 2 day(s) observed" in text
    # Where each figure comes from, and a window's bound to the microsecond (shown to the
    # second it could not be copied: it counted other events; a review).
    assert "The spend events behind a figure: vapora events --type spend_recorded" in text
    async with await Ledger.open(path) as ledger:
        since = T + timedelta(microseconds=1)
        windowed = await ledger.report(since, since + timedelta(hours=1), now=T + timedelta(days=1))
    text = render_report(windowed)
    assert f"{since:%Y-%m-%d %H:%M:%S}.000001 UTC" in text
    assert f"--since {since.isoformat().replace('+00:00', 'Z')}" in text


def leased_log() -> list[tuple[Event, int]]:
    """The clean log plus a router's lease: granted, two spends against it, then returned."""
    log = clean_log()
    seq = log[-1][1]
    lease = BudgetLeased(
        id="lease-1",
        at=T,
        lease_id="L1",
        holder="router-a",
        granted_usd=Decimal(2),
        expires_at=T + timedelta(minutes=5),
    )
    spends = [spend(20 + i, SONNET, (1000, 100, 0, 0), T + timedelta(seconds=i)) for i in (1, 2)]
    spends = [msgspec.structs.replace(s, reservation_id="L1") for s in spends]
    kept = sum((s.cost_usd for s in spends), Decimal(0))
    back = BudgetLeaseReturned(
        id="lease-1-back",
        at=T,
        lease_id="L1",
        holder="router-a",
        kept_usd=kept,
        reason="returned",
        version=2,
    )
    return log + [(event, seq + n) for n, event in enumerate([lease, *spends, back], start=1)]


@pytest.mark.anyio
async def test_lease_events_pass_the_audit_and_spend_against_a_lease_is_in_the_ledger(
    tmp_path: Path,
):
    log = leased_log()
    keeper = budget.catch_up(budget.EMPTY, log)
    assert keeper.leased_usd == 0 and keeper.total_spent_usd > 0
    result = await audit_of(await ledger_of(tmp_path, log), log, keeper=keeper)
    assert result.ok, result.discrepancies
    assert result.rows_checked == len({e.id for e, _ in log if isinstance(e, SpendRecorded)}) == 9


def test_a_keeper_whose_lease_drifted_from_the_log_is_named():
    log = leased_log()
    assert check_budget(log, budget.catch_up(budget.EMPTY, log)) == []
    unreturned = budget.catch_up(budget.EMPTY, [(e, s) for e, s in log if e.id != "lease-1-back"])
    unreturned = dataclasses.replace(unreturned, last_sequence=log[-1][1])
    where = {d.where for d in check_budget(log, unreturned)}
    assert where == {"budget keeper leased", "budget keeper open leases"}


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 2, 5, 7, 100])
async def test_the_audit_fed_chunk_by_chunk_finds_what_the_whole_log_audit_finds(
    tmp_path: Path, size: int
) -> None:
    """``vapora audit`` reads the log and the ledger a chunk of sequences at a time (it held
    both whole: ~2.2 KB a spend event). Chunked, a clean log has no difference, the duplicate
    append (its first appearance in an earlier chunk) counts once, and an altered row, a
    mispriced event and a missing row are each found, as by the whole-log audit."""
    from vapora.audit import Auditor

    log = clean_log()
    path = await ledger_of(tmp_path, log)
    spends = [(e, s) for e, s in log if isinstance(e, SpendRecorded)]
    wrong = msgspec.structs.replace(spends[1][0], cost_usd=spends[1][0].cost_usd + 1)
    log = [(wrong if e is spends[1][0] else e, s) for e, s in log]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE spend SET input_tokens = 1 WHERE seq = ?", (spends[2][1],))
        db.execute("DELETE FROM spend WHERE seq = ?", (spends[4][1],))
    async with await Ledger.open(path) as ledger:
        rows, logged = await ledger.spend_rows(), await ledger.logged_events()
        whole = audit(log, rows, logged)
        auditor = Auditor()
        for start in range(0, len(log), size):
            chunk = log[start : start + size]
            low = chunk[0][1] - 1
            high = chunk[-1][1]
            part_rows, part_logged = await ledger.snapshot(through=high, after=low)
            auditor.feed(chunk, part_rows, part_logged)
    chunked = auditor.finish()
    assert sorted(map(str, chunked.discrepancies)) == sorted(map(str, whole.discrepancies))
    assert len(chunked.discrepancies) >= 4  # the cost, the row's field, the missing row, totals
    assert (chunked.events_checked, chunked.spends_checked, chunked.rows_checked) == (
        whole.events_checked,
        whole.spends_checked,
        whole.rows_checked,
    )


def test_the_audit_and_the_report_sum_amounts_of_many_digits_exactly() -> None:
    """Their totals were made at Python's default 28 digits: a cost priced at 50 digits lost its
    last ones in the audit's and the report's sums."""
    from vapora.audit import replay_totals
    from vapora.ledger import ReportRow, cost_report

    small = Decimal("0.003354359776318461820434594158")
    events = [
        msgspec.structs.replace(spend(1, SONNET, (1, 0, 0, 0), T), cost_usd=Decimal("123.45")),
        msgspec.structs.replace(spend(2, SONNET, (1, 0, 0, 0), T), cost_usd=small),
    ]
    exact = Decimal("123.453354359776318461820434594158")
    assert replay_totals(events).total_usd == exact
    rows = [ReportRow(T, "claude", "m", "GeneralQuery", e.cost_usd) for e in events]
    report = cost_report(rows, since=None, until=None, now=T, month_to_date=exact)
    assert report.total_usd == exact and report.by_provider["claude"] == exact
