"""``vapora events --follow`` against a real nats-server that restarts under it."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from pathlib import Path

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


async def test_a_filtered_follower_reads_its_subjects_and_stalls_only_on_them(
    event_log: EventLog,
) -> None:
    """The router's views follow filtered tails: only the events on the filter are applied,
    and only an unread event on the filter counts as the tail being stuck (others moving the
    stream on do not make it reopen its tail)."""
    prefix = event_log.settings.prefix
    seen: list[str] = []
    position = 0

    async def apply(batch: list[LogEntry[Event]]) -> None:
        nonlocal position
        seen.extend(entry.subject for entry in batch)
        position = batch[-1].seq

    follower = LogFollower(
        event_log,
        name="test",
        apply=apply,
        position=lambda: position,
        filter_subject=f"{prefix}.health.>",
    )
    await event_log.append(released(1), subject=f"{prefix}.health.claude")
    await event_log.append(released(2), subject=f"{prefix}.other")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            while position < 1:  # noqa: ASYNC110 - waits for the projection
                await anyio.sleep(0.01)
            for n in range(3, 6):  # the stream moves on, off the filter
                await event_log.append(released(n), subject=f"{prefix}.other")
            follower._progress = 0.0  # as if nothing had arrived for longer than stall_s
            assert not await follower._stalled()
            assert await event_log.has_after(position, f"{prefix}.health.>") is False
            await event_log.append(released(6), subject=f"{prefix}.health.openai")
            assert await event_log.has_after(position, f"{prefix}.health.>") is True
            while position < 6:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert seen == [f"{prefix}.health.claude", f"{prefix}.health.openai"]
    assert follower.restarts == 0


async def test_a_filtered_follower_reopens_a_tail_whose_consumer_vanished(
    event_log: EventLog,
) -> None:
    """The consumer behind the tail is deleted (as a node's loss would take it) while the
    client stays connected: the tail goes on from the last event it gave with a new consumer
    (the deletion is announced to its pull request), or its follower reopens it on an unread
    event on the filter; either way the next event is applied, once."""
    prefix = event_log.settings.prefix
    applied: list[int] = []

    async def apply(batch: list[LogEntry[Event]]) -> None:
        applied.extend(entry.seq for entry in batch)

    follower = LogFollower(
        event_log,
        name="test",
        apply=apply,
        position=lambda: applied[-1] if applied else 0,
        filter_subject=f"{prefix}.health.>",
        stall_s=0.3,
        check_s=0.1,
    )
    await event_log.append(released(1), subject=f"{prefix}.health.claude")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            while not applied:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            for info in await event_log.js.consumers_info(event_log.settings.name):
                await event_log.js.delete_consumer(event_log.settings.name, info.name)
            await event_log.append(released(2), subject=f"{prefix}.other")
            await event_log.append(released(3), subject=f"{prefix}.health.gemini")
            while len(applied) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert applied == [1, 3]
    assert follower.restarts + event_log.replay_resumes >= 1


async def test_the_routers_views_follow_the_log_after_their_consumers_vanished(
    tmp_path: Path,
) -> None:
    """The router's health, budget and spend views are filtered followers: with the consumers
    behind them deleted (a node's loss) and the client still connected, a tier change appended
    afterwards still reaches the router (it used to wait on the lost consumer for ever)."""
    import msgspec

    from events.contract import Tier
    from events.log import BudgetTierChanged
    from tests.fault.provider_harness import config_text, deployment
    from tests.samples import EVENTS

    async with deployment(tmp_path, config_text) as dep:
        router = dep.router
        assert router is not None and router.tier is Tier.NORMAL
        stream = dep.log.settings.name
        for info in await dep.log.js.consumers_info(stream):
            await dep.log.js.delete_consumer(stream, info.name)
        tier = EVENTS["budget_tier_changed"]
        assert isinstance(tier, BudgetTierChanged)
        await dep.log.append(
            msgspec.structs.replace(tier, id=uuid.uuid4().hex, at=datetime.now(UTC))
        )
        with anyio.fail_after(20):  # a stall is noticed within stall_s (2 s)
            while router.tier is not Tier.NEAR_THRESHOLD:  # noqa: ASYNC110
                await anyio.sleep(0.05)


async def test_a_replay_goes_on_through_a_server_restart(
    server: EmbeddedNats, conn: Client
) -> None:
    """The budget keeper and the ledger replay the log at start: a nats-server restart in the
    middle of a replay takes its consumer; the replay goes on from the event after the last it
    gave, through a new consumer, with every event once."""
    log = EventLog(conn)
    await log.ensure_stream()
    total = 10_000  # three batches of 4096
    for start in range(0, total, 2000):
        await log.append_many([released(n) for n in range(start, start + 2000)])
    seqs: list[int] = []
    with anyio.fail_after(60):
        async for batch in log.replay(1):
            seqs.extend(entry.seq for entry in batch)
            if len(seqs) == len(batch):  # after the first batch
                await server.stop()
                await server.start()  # same port, same data directory
    assert seqs == list(range(1, total + 1))
    assert log.replay_resumes >= 1


async def test_events_follow_says_an_event_stored_again_as_it_comes(
    server: EmbeddedNats, conn: Client
) -> None:
    """Listed once; a repeat was said only at the end of the listing, which a follow never
    reaches (a review)."""
    from events.codec import encode
    from events.subjects import event_subject

    log = EventLog(conn)
    await log.ensure_stream()
    first = released(1)
    await log.append(first)
    out, err = io.StringIO(), io.StringIO()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: events_command(log, follow=True, type_=None, task_id=None, out=out, err=err)
            )
            await lines_reach(out, 1)
            subject = event_subject("budget_released", None, log.settings.prefix)
            await log.js.publish(subject, encode(first))  # stored again, no message id
            await log.append(released(2))
            await lines_reach(out, 2)
            while "stores event" not in err.getvalue():  # noqa: ASYNC110 - the follower's task
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert out.getvalue().count(first.id) == 1
    assert f"stores event {first.id} again (listed at " in err.getvalue()
