"""``vapora audit`` and ``vapora report --json`` against running actors on a real nats-server: a
ledger that goes on taking appends while the audit reads it, a keeper that counted a late
duplicate twice, and money in the report's JSON."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.budget_keeper import BudgetKeeper
from actors.connection import Client
from actors.cost_ledger import LEDGER_FILE, CostLedger
from actors.eventlog import EventLog, LogEntry
from events.codec import encode
from events.log import Event
from tests.fault.money import (
    NOON,
    FakeClock,
    eventually,
    exact_usage,
    running,
    runtime,
    spend,
    status,
)
from vapora.cli.money import audit_command, report_command

pytestmark = pytest.mark.anyio

CENT = Decimal("0.003")


class LedgerRunsAhead:
    """The event log, whose replay hands over each batch only once the ledger has applied a
    few events past it: the appends a live system takes while the audit runs. (It waited after
    the replay's end, which only a replay that lost the log's tail ever got to: the audit stops
    reading at the end it took first.)"""

    def __init__(self, log: EventLog, ledger: CostLedger) -> None:
        self._log, self._ledger = log, ledger
        self.replayed_to = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def replay(self, start_seq: int = 1) -> AsyncIterator[list[LogEntry[Event]]]:
        async def ledger_moved_on() -> bool:
            return self._ledger.position >= self.replayed_to + 3

        async for batch in self._log.replay(start_seq):
            self.replayed_to = batch[-1].seq
            await eventually(ledger_moved_on)
            yield batch


async def test_an_audit_while_the_ledger_takes_appends_compares_up_to_its_own_replay(
    conn: Client, tmp_path: Path
) -> None:
    """The audit read every row of the ledger once it had reached the replay's end, so the spend
    appended meanwhile was "not in the log" (a false difference on every busy system)."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    await rt.log.append_many(
        [spend(task_id=f"old-{i}", usage=exact_usage(CENT), at=clock()) for i in range(200)]
    )
    stop = anyio.Event()

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            await rt.log.append(spend(task_id=f"live-{i}", usage=exact_usage(CENT), at=clock()))
            i += 1
            await anyio.sleep(0.002)

    async with running(CostLedger(rt)) as ledger, anyio.create_task_group() as tg:
        tg.start_soon(traffic)
        log = LedgerRunsAhead(rt.log, ledger)
        code, text = await audit_command(conn, log, tmp_path)  # type: ignore[arg-type]
        assert code == 0, text
        assert "no differences" in text
        # Audited up to the log's end as the audit began; the ledger had moved on past it.
        audited = int(re.search(r"up to sequence (\d+),", text).group(1))  # type: ignore[union-attr]
        assert 200 <= audited <= log.replayed_to
        assert ledger.position > audited  # the race was run

        # A real difference is still found, among the rows the replay covers. The traffic
        # stopped first: under it the ledger's own commits, 20 ms apart, could keep this second
        # writer from the lock past its 30 s wait (SQLite's busy handler is no queue).
        stop.set()

        async def caught_up() -> bool:
            return ledger.position == await rt.log.last_sequence()

        await eventually(caught_up)
        # The write lock taken first (a deferred transaction upgraded to a write fails at once,
        # "database is locked", when the ledger committed since it began to read).
        db = sqlite3.connect(tmp_path / LEDGER_FILE, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE spend SET cost_usd = '0.5' WHERE seq = 7")
            db.execute("COMMIT")
        finally:
            db.close()
        code, text = await audit_command(conn, rt.log, tmp_path)  # the traffic stopped
    assert code == 1
    assert "ledger row seq 7: cost_usd" in text and "not in the log" not in text


async def test_the_audit_finds_a_duplicate_the_keeper_counted_twice_after_forgetting_it(
    conn: Client, tmp_path: Path
) -> None:
    """The keeper forgets a counted spend id a day (of event time) after it; the same event
    appended again later is counted twice by the keeper, and by the audit's replay of the log
    through the same fold: the audit passed. The ledger's own rows count it once."""
    clock = FakeClock()  # the keeper's "now": NOON, June 15
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    early = spend(task_id="early", usage=exact_usage(Decimal("0.3")), at=NOON - timedelta(days=3))
    hourly = [  # three days of spend: event time moves on an hour at a time
        spend(task_id=f"t{h}", usage=exact_usage(CENT), at=early.at + timedelta(hours=h))
        for h in range(1, 73)
    ]
    await rt.log.append_many([early, *hourly])
    once = Decimal("0.3") + 72 * CENT  # $0.516

    async with running(BudgetKeeper(rt)), running(CostLedger(rt)) as ledger:
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 0, text
        # The same event again, days later: past the stream's duplicate window (published
        # without its Nats-Msg-Id, as a held-events file adopted days later would be stored).
        await conn.publish(f"{rt.log.settings.prefix}.spend.claude", encode(early))
        await conn.flush()

        async def both_have_it() -> bool:
            keeper = await status(conn)
            return ledger.position == 74 and keeper.spent_month_usd == once + Decimal("0.3")

        await eventually(both_have_it)  # the keeper counted it twice
        code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 1, text
    keeper_lines = [line for line in text.splitlines() if "budget keeper" in line]
    assert len(keeper_lines) == 1, text
    assert "budget keeper spent this month vs the ledger's rows" in keeper_lines[0]
    assert "$0.516" in keeper_lines[0] and "$0.816" in keeper_lines[0]


async def test_report_json_writes_money_as_plain_decimal_strings(
    conn: Client, tmp_path: Path
) -> None:
    """It wrote ``"7.5E-8"`` and ``"0E-7"``: Python's spelling of small decimals."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    tiny = exact_usage(Decimal("0.000003"))
    await rt.log.append(
        spend(task_id="a", usage=tiny, at=clock(), provider="gemini", cost_usd=Decimal("7.5E-8"))
    )
    await rt.log.append(
        spend(task_id="b", usage=tiny, at=clock(), provider="ollama", cost_usd=Decimal("0E-7"))
    )
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _at(ledger, 2))
        text = await report_command(conn, since=None, until=None, as_json=True)
    assert "E-" not in text
    report = json.loads(text)
    assert report["total_usd"] == "0.000000075"
    assert report["by_provider"] == {"gemini": "0.000000075", "ollama": "0.0000000"}
    assert report["calls"] == 2 and report["last_sequence"] == 2


async def _at(ledger: CostLedger, seq: int) -> bool:
    return ledger.position >= seq


class KeeperComesBack:
    """The event log, whose replay starts the budget keeper once it has read its first batch:
    a keeper restarting when the audit began, serving again by its end."""

    def __init__(self, log: EventLog, start: Any) -> None:
        self._log, self._start = log, start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def replay(self, start_seq: int = 1) -> AsyncIterator[list[LogEntry[Event]]]:
        first = True
        async for batch in self._log.replay(start_seq):
            if first:
                first = False
                await self._start()
            yield batch


async def test_a_keeper_that_comes_up_during_the_audit_is_still_compared(
    conn: Client, tmp_path: Path
) -> None:
    """The audit asks whether a keeper runs before reading the log (to fold the log only for
    one); a keeper restarting then, serving by the end, was left out: "comparison skipped",
    and the double count it holds (see the test above) passed."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    early = spend(task_id="early", usage=exact_usage(Decimal("0.3")), at=NOON - timedelta(days=3))
    hourly = [
        spend(task_id=f"t{h}", usage=exact_usage(CENT), at=early.at + timedelta(hours=h))
        for h in range(1, 73)
    ]
    await rt.log.append_many([early, *hourly])
    async with running(CostLedger(rt)) as ledger, anyio.create_task_group() as tg:
        # The early spend stored again three days later: the keeper, which has forgotten its
        # id by then, counts it twice; the ledger once.
        await conn.publish(f"{rt.log.settings.prefix}.spend.claude", encode(early))
        await conn.flush()

        async def at_end() -> bool:
            return ledger.position == 74

        await eventually(at_end)
        keeper = BudgetKeeper(rt)

        async def start() -> None:
            await tg.start(keeper.run)

        code, text = await audit_command(conn, KeeperComesBack(rt.log, start), tmp_path)  # type: ignore[arg-type]
        keeper.stop()
    assert "no budget keeper is running" not in text
    assert code == 1 and "budget keeper spent this month" in text
    assert "move budget.snapshot" not in text  # (a rebuild from the log counts it the same)
