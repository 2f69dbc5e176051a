"""Restart under load: the budget keeper and the cost ledger run in a real OS process
(``tests/fault/money_process.py``); callers keep reserving and settling while that process is
SIGKILLed and started again, or while the nats-server itself is SIGKILLed and restarted on the
same port and data directory. Afterwards the keeper's totals equal the log's spend to the last
decimal, the ledger holds every event exactly once (the audit passes), and reservations of
callers that died expire."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from actors.connection import Client
from actors.eventlog import EventLog
from actors.server import EmbeddedNats
from events.log import BudgetReleased, SpendRecorded
from tests.fault.money import (
    client,
    eventually,
    read_log,
    release,
    reserve,
    spend,
    status,
    usage_costing_at_most,
)
from tests.fault.money_process import MoneyProcess
from vapora.cli.money import audit_command

pytestmark = pytest.mark.anyio

AMOUNT = Decimal("0.01")
DAILY_CENTS = 60  # fits 60 holds of $0.01: the load runs into the limit
TTL_S = 1.0


@dataclass
class Load:
    """Callers reserving, settling (as a provider actor would), releasing, or dying."""

    nc: Client
    log: EventLog
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    answered: int = 0
    admitted: int = 0
    refused: int = 0
    errors: int = 0
    abandoned: list[str] = field(default_factory=list)
    running: bool = True

    async def caller(self) -> None:
        while self.running:
            try:
                await self.one_call()
            except Exception:  # the keeper or the server is down: try again shortly
                self.errors += 1
                await anyio.sleep(0.05)

    async def one_call(self) -> None:
        task_id = uuid.uuid4().hex
        reply = await reserve(self.nc, AMOUNT, task_id=task_id, ttl_s=TTL_S, wait_s=1.0)
        self.answered += 1
        if not reply.admitted:
            self.refused += 1
            await anyio.sleep(0.02)
            return
        self.admitted += 1
        fate = self.rng.random()
        if fate < 0.1:  # the caller dies holding the reservation
            self.abandoned.append(reply.reservation_id)
        elif fate < 0.25:
            await release(self.nc, reply.reservation_id, wait_s=1.0)
        else:
            usage = usage_costing_at_most(AMOUNT, self.rng)
            event = spend(
                task_id=task_id,
                usage=usage,
                at=datetime.now(UTC),
                reservation_id=reply.reservation_id,
            )
            await self.log.append(event)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    nats = EmbeddedNats(tmp_path / "nats")
    await nats.start()
    yield nats
    await nats.stop()


async def _quiet(nc: Client, log: EventLog, load: Load) -> None:
    """Wait until no reservation is open and the ledger has applied the whole log."""

    async def settled() -> bool:
        current = await status(nc)
        return current.open_reservations == 0

    await eventually(settled, within=20, every=0.2)


async def _check_books(nc: Client, log: EventLog, data_dir: Path, load: Load) -> None:
    entries = await read_log(log)
    current = await status(nc)
    today = current.at.date()
    spends = {e.event.id: e.event for e in entries if isinstance(e.event, SpendRecorded)}
    on_the_day = sum((s.cost_usd for s in spends.values() if s.at.date() == today), Decimal(0))
    assert current.spent_today_usd == on_the_day  # to the last decimal
    assert current.spent_today_usd <= Decimal(DAILY_CENTS) / 100
    assert (current.open_reservations, current.reserved_usd) == (0, Decimal(0))
    expired = {
        e.event.reservation_id
        for e in entries
        if isinstance(e.event, BudgetReleased) and e.event.reason == "expired"
    }
    assert set(load.abandoned) <= expired  # dead callers' holds were released by expiry
    code, text = await audit_command(nc, log, data_dir)
    assert code == 0, text
    assert "no differences" in text and "skipped" not in text


async def _run_load(load: Load, seconds: float, tg: anyio.abc.TaskGroup, callers: int = 12) -> None:
    for _ in range(callers):
        tg.start_soon(load.caller)
    await anyio.sleep(seconds)


async def test_sigkill_of_the_keeper_and_ledger_process_mid_load(
    server: EmbeddedNats, tmp_path: Path
) -> None:
    data_dir = tmp_path / "money"
    data_dir.mkdir()
    money = MoneyProcess(server.url, data_dir, daily_cents=DAILY_CENTS)
    nc = await client(server.url, "callers")
    log = EventLog(nc)
    await money.start()
    load = Load(nc, log)
    try:
        async with anyio.create_task_group() as tg:
            await _run_load(load, 1.0, tg)
            answered_before = load.answered
            money.kill()  # mid-load: reservations open, appends in flight
            await anyio.sleep(0.3)
            await money.start()
            await anyio.sleep(1.0)
            load.running = False
        assert answered_before > 0 and load.answered > answered_before  # served again
        assert load.refused > 0  # the load ran into the daily limit
        assert (data_dir / "budget.snapshot").exists()
        await _quiet(nc, log, load)
        await _check_books(nc, log, data_dir, load)
    finally:
        await money.stop()
        await nc.close()


async def test_sigkill_of_the_nats_server_mid_load(server: EmbeddedNats, tmp_path: Path) -> None:
    data_dir = tmp_path / "money"
    data_dir.mkdir()
    money = MoneyProcess(server.url, data_dir, daily_cents=DAILY_CENTS)
    nc = await client(server.url, "callers")
    log = EventLog(nc)
    await money.start()
    load = Load(nc, log)
    restarted = EmbeddedNats(server.data_dir, port=server.port)
    try:
        async with anyio.create_task_group() as tg:
            await _run_load(load, 1.0, tg)
            answered_before = load.answered
            server.kill()
            await anyio.sleep(0.5)
            await restarted.start()
            await anyio.sleep(2.0)
            load.running = False
        assert money.alive(), money.log_text()  # it rode out the server's restart
        assert load.answered > answered_before, money.log_text()
        await _quiet(nc, log, load)
        await _check_books(nc, log, data_dir, load)
    finally:
        await money.stop()
        await nc.close()
        await restarted.stop()
