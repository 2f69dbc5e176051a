"""``vapora events --follow`` against a real nats-server that restarts under it."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import anyio
import pytest

from actors.connection import Client
from actors.eventlog import EventLog, LogEntry
from actors.follow import LogFollower
from actors.server import EmbeddedNats
from events import BudgetReleased
from events.log import Event
from vapora.cli.money import events_command

pytestmark = pytest.mark.anyio


def released(n: int) -> BudgetReleased:
    return BudgetReleased(
        id=uuid.uuid4().hex,
        at=datetime.now(UTC),
        task_id=f"task-{n}",
        reservation_id=f"r-{n}",
        reason="settled",
    )


async def lines_reach(out: io.StringIO, n: int) -> list[str]:
    while len(lines := out.getvalue().splitlines()) < n:  # noqa: ASYNC110 - polls a buffer
        await anyio.sleep(0.05)
    return lines


async def append_when_back(log: EventLog, event: BudgetReleased) -> None:
    while True:
        try:
            await log.append(event)
            return
        except Exception:  # reconnecting: the server is starting again
            await anyio.sleep(0.1)


async def test_events_follow_prints_on_through_a_server_restart(
    server: EmbeddedNats, conn: Client
) -> None:
    log = EventLog(conn)
    await log.ensure_stream()
    await log.append(released(1))
    out = io.StringIO()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: events_command(log, follow=True, type_=None, task_id=None, out=out)
            )
            await lines_reach(out, 1)
            await server.stop()
            await server.start()  # same port, same data directory
            await append_when_back(log, released(2))
            await append_when_back(log, released(3))
            lines = await lines_reach(out, 3)
            tg.cancel_scope.cancel()
    assert [line.count('"task_id":"task-') for line in lines] == [1, 1, 1]
    assert ['"task-1"' in lines[0], '"task-2"' in lines[1], '"task-3"' in lines[2]] == [True] * 3


async def test_a_lingering_follower_applies_what_arrived_meanwhile_in_one_batch(
    event_log: EventLog,
) -> None:
    """The ledger's follower waits ``linger_s`` after each batch: events appended during that
    wait reach the projection together (one transaction), none lost, none repeated."""
    batches: list[list[int]] = []
    position = 0

    async def apply(batch: list[LogEntry[Event]]) -> None:
        nonlocal position
        batches.append([entry.seq for entry in batch])
        position = batch[-1].seq

    follower = LogFollower(
        event_log, name="test", apply=apply, position=lambda: position, linger_s=2.0
    )  # ten appends one by one take ~20 ms here; 2 s leaves room for a loaded machine
    await event_log.append(released(0))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            while not batches:  # noqa: ASYNC110 - waits for the first batch
                await anyio.sleep(0.01)
            for n in range(1, 11):  # appended one by one while the follower lingers
                await event_log.append(released(n))
            while position < 11:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert batches == [[1], list(range(2, 12))]
