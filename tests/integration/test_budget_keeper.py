"""The budget keeper on a real nats-server (a fresh one per test: the keeper's subjects are fixed):
no overspend under concurrency, tiers as events naming their cause, a second keeper fenced out,
expiry, snapshots, and 400s for malformed requests that leave the state alone."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.errors import NoRespondersError

from actors.budget_keeper import SNAPSHOT_FILE, BudgetKeeper
from actors.connection import Client
from actors.runner import utc_now
from actors.server import EmbeddedNats
from events import subjects
from events.codec import encode
from events.contract import BudgetReserve, BudgetReserveReply, BudgetStatus, Tier
from events.log import BudgetReleased, BudgetReserved, BudgetTierChanged, SpendRecorded
from tests.fault.money import (
    NOON,
    FakeClock,
    ask,
    client,
    config,
    events_of,
    eventually,
    exact_usage,
    read_log,
    release,
    reserve,
    running,
    runtime,
    serving,
    spend,
    status,
    total_spend,
    usage_costing_at_most,
)
from vapora import audit, budget
from vapora.errors import ConcurrencyConflict

pytestmark = pytest.mark.anyio


# --- no overspend -------------------------------------------------------------------------------


async def test_500_concurrent_reservations_never_overspend_the_daily_limit(
    conn: Client, tmp_path: Path
) -> None:
    amount = Decimal("0.01")  # the daily limit of $0.50 fits 50 such holds
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=50), clock=clock))
    rng = random.Random(5)
    replies: list[BudgetReserveReply] = []
    settled: list[SpendRecorded] = []

    async def one_task(n: int) -> None:
        task_id = f"task-{n}"
        reply = await reserve(conn, amount, task_id=task_id)
        replies.append(reply)
        if not reply.admitted:
            return
        await anyio.sleep(rng.random() * 0.05)  # the provider call
        if rng.random() < 0.2:  # the call failed before anything was billed
            assert (await release(conn, reply.reservation_id)).status is None
            return
        event = spend(
            task_id=task_id,
            usage=usage_costing_at_most(amount, rng),
            at=clock(),
            reservation_id=reply.reservation_id,
        )
        await keeper.log.append(event)  # as the provider actor would
        settled.append(event)

    async with running(keeper):
        async with anyio.create_task_group() as tg:
            for n in range(500):
                tg.start_soon(one_task, n)
        await eventually(lambda: _settled(keeper, conn))
        final = await status(conn)
        entries = await read_log(keeper.log)

    admitted = [r for r in replies if r.admitted]
    refused = [r for r in replies if not r.admitted]
    assert len(replies) == 500
    assert 50 <= len(admitted) < 500 and refused  # settling below the hold frees room
    # Past the warn threshold (90 %) the tier is Exceeded and paid holds are refused as such.
    assert all(
        r.reason.startswith("daily limit $0.5 would be exceeded") or "Exceeded" in r.reason
        for r in refused
    )
    recorded = total_spend(entries)
    assert recorded <= Decimal("0.50")
    assert recorded == sum((e.cost_usd for e in settled), Decimal(0))
    assert final.spent_today_usd == recorded and final.reserved_usd == 0
    reserved = [e.event for e in entries if isinstance(e.event, BudgetReserved)]
    assert sorted(e.reservation_id for e in reserved) == sorted(r.reservation_id for r in admitted)
    # At every point of the log, spend plus open holds stayed within the limit.
    state = budget.EMPTY
    for entry in entries:
        state = budget.evolve(state, entry.event, entry.seq)
        assert state.spent_on(NOON.date()) + state.reserved_usd <= Decimal("0.50")
    assert keeper.state.total_spent_usd == recorded
    # Our own events were folded at append time and again from the tail: no double counting.
    assert audit.check_budget([(e.event, e.seq) for e in entries], keeper.state) == []
    assert keeper.state.tasks() == state.tasks()


async def _settled(keeper: BudgetKeeper, nc: Client) -> bool:
    current = await status(nc)
    return current.open_reservations == 0 and keeper.state.last_sequence == (
        await keeper.log.last_sequence()
    )


# --- tiers ---------------------------------------------------------------------------------------


async def test_tier_changes_at_50_and_90_percent_are_events_naming_their_cause(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    keeper = BudgetKeeper(
        runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock), tick_s=0.05
    )

    async def tier_events() -> list[BudgetTierChanged]:
        return [e for e, _ in await events_of(keeper.log, BudgetTierChanged)]

    async def provider_spends(cost: str) -> SpendRecorded:
        event = spend(task_id=uuid.uuid4().hex, usage=exact_usage(Decimal(cost)), at=clock())
        await keeper.log.append(event)
        return event

    async with running(keeper):
        await provider_spends("0.30")
        await eventually(lambda: _caught_up(keeper))
        assert (await status(conn)).tier == Tier.NORMAL and not await tier_events()

        near = await provider_spends("0.24")  # 54 %
        changes = await eventually(tier_events)
        assert [(c.from_tier, c.to_tier, c.causation_id) for c in changes] == [
            (Tier.NORMAL, Tier.NEAR_THRESHOLD, near.id)
        ]
        assert (await status(conn)).tier == Tier.NEAR_THRESHOLD

        hold = await reserve(conn, Decimal("0.40"))  # 94 % with the hold counted
        assert hold.admitted and hold.tier == Tier.EXCEEDED
        [(reserved, _)] = await events_of(keeper.log, BudgetReserved)
        # Exceeded admits zero-cost providers only: a paid attempt decided by a router that has
        # not heard of the tier yet is refused, though it would fit the limit (it was admitted).
        late = await reserve(conn, Decimal("0.01"))
        assert not late.admitted and "Exceeded" in (late.reason or "")
        changes = await eventually(lambda: _more(tier_events, 2))
        assert (changes[1].to_tier, changes[1].causation_id) == (Tier.EXCEEDED, reserved.id)
        assert changes[1].daily_percent == pytest.approx(94.0)
        current = await status(conn)
        assert (current.tier, current.daily_percent) == (Tier.EXCEEDED, pytest.approx(94.0))

        assert (await release(conn, hold.reservation_id)).status is None  # back to 54 %
        [(released, _)] = await events_of(keeper.log, BudgetReleased)
        changes = await eventually(lambda: _more(tier_events, 3))
        assert (changes[2].from_tier, changes[2].to_tier) == (Tier.EXCEEDED, Tier.NEAR_THRESHOLD)
        assert changes[2].causation_id == released.id
        assert (await status(conn)).tier == Tier.NEAR_THRESHOLD


async def _caught_up(keeper: BudgetKeeper) -> bool:
    return keeper.state.last_sequence == await keeper.log.last_sequence()


async def _more(read: object, n: int) -> object:
    found = await read()  # type: ignore[operator]
    return found if len(found) >= n else None


# --- a second keeper -----------------------------------------------------------------------------


async def test_a_second_keeper_is_fenced_out_and_never_admits_what_it_cannot_record(
    server: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="vapora.budget")
    nc_a, nc_b, caller = [await client(server.url, n) for n in ("a", "b", "caller")]
    limits = config(daily_cents=1000)
    first = BudgetKeeper(runtime(nc_a, tmp_path / "a", cfg=limits))
    second = BudgetKeeper(runtime(nc_b, tmp_path / "b", cfg=limits))
    async with running(first):
        await serving(caller)
        assert (await reserve(caller, Decimal("0.10"))).admitted
        async with running(second):  # started by mistake on the same log
            replies = [await ask(caller, subjects.BUDGET_RESERVE, _reserve(n)) for n in range(40)]
            fenced = await eventually(lambda: _one_fenced([first, second]))
            survivor = second if fenced is first else first
            assert survivor.fenced_out is None
            # Once fenced out, the keeper refuses to write: a direct call gets 409.
            with pytest.raises(ConcurrencyConflict, match="stopped writing"):
                await fenced.reserve(_reserve(99), None)  # type: ignore[arg-type]
            before = len(await read_log(first.log))
            later = [
                await ask(caller, subjects.BUDGET_RESERVE, _reserve(100 + n)) for n in range(20)
            ]
            # Once it has left the writing endpoints' queue group, the survivor answers them all
            # (the fenced one answered its share 409, and those paid attempts were skipped).
            await eventually(lambda: _withdrawn(fenced))
            last = [
                await ask(caller, subjects.BUDGET_RESERVE, _reserve(200 + n)) for n in range(20)
            ]
            assert [a.status for a in last] == [None] * 20
            entries = await read_log(first.log)
    assert "FENCED OUT" in caplog.text
    answers = replies + later + last
    admitted = {
        a.as_(BudgetReserveReply).reservation_id
        for a in answers
        if a.status is None and a.as_(BudgetReserveReply).admitted
    }
    conflicts = [a for a in answers if a.status is not None]
    assert all(a.status == "409" and a.error().error.code == "conflict" for a in conflicts)
    assert len(admitted) + len(conflicts) == 80
    logged = {e.event.reservation_id for e in entries if isinstance(e.event, BudgetReserved)}
    assert admitted <= logged  # every admission answered was recorded in the log
    assert len(logged) == len(admitted) + 1  # ... and nothing else but the very first one
    # After the fencing only the survivor writes: one reservation per admission it answered.
    late = [e for e in entries[before:] if isinstance(e.event, BudgetReserved)]
    assert len(late) == sum(1 for a in later + last if a.status is None)
    for nc in (nc_a, nc_b, caller):
        await nc.close()


def _reserve(n: int) -> BudgetReserve:
    return BudgetReserve(
        reservation_id=f"r-{n}-{uuid.uuid4().hex[:6]}",
        task_id=f"t-{n}",
        provider="claude",
        amount_usd=Decimal("0.01"),
    )


async def _withdrawn(keeper: BudgetKeeper) -> bool:
    return keeper._withdrawn


async def _one_fenced(keepers: list[BudgetKeeper]) -> BudgetKeeper | None:
    fenced = [k for k in keepers if k.fenced_out is not None]
    assert len(fenced) <= 1
    return fenced[0] if fenced else None


async def test_an_append_by_another_writer_fences_the_keeper_out(
    conn: Client, tmp_path: Path
) -> None:
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100)))
    async with running(keeper):
        assert (await reserve(conn, Decimal("0.10"))).admitted
        rogue = BudgetReleased(
            id="rogue", at=NOON, task_id="t", reservation_id="nope", reason="failed"
        )
        await keeper.log.append(rogue, subject=keeper.subject, expected_last_subject_seq=1)
        answer = await ask(conn, subjects.BUDGET_RESERVE, _reserve(1))
        assert answer.status == "409"
        assert "another writer appended rogue" in answer.error().error.message
        last = await keeper.log.last_sequence()

        async def withdrawn() -> bool:
            # It leaves the writing endpoints' queue group to a keeper that writes (none here):
            # it answered its share of them 409, and those attempts were skipped.
            try:
                await ask(conn, subjects.BUDGET_RESERVE, _reserve(2), wait_s=2)
            except NoRespondersError:
                return True
            return False

        await eventually(withdrawn)
        assert await keeper.log.last_sequence() == last  # it wrote nothing more
        assert (await status(conn)).open_reservations == 1  # the status still answers


# --- expiry --------------------------------------------------------------------------------------


async def test_a_reservation_never_settled_is_released_as_expired_after_its_ttl(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    keeper = BudgetKeeper(
        runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock), tick_s=0.05
    )
    async with running(keeper):
        held = await reserve(conn, Decimal("0.30"), ttl_s=30)
        kept = await reserve(conn, Decimal("0.20"), ttl_s=300)
        await anyio.sleep(0.3)
        assert (await status(conn)).open_reservations == 2  # time has not moved
        clock.advance(31)
        released = await eventually(lambda: events_of(keeper.log, BudgetReleased))
        assert [(e.reservation_id, e.reason) for e, _ in released] == [
            (held.reservation_id, "expired")
        ]
        current = await status(conn)
        assert (current.open_reservations, current.reserved_usd) == (1, Decimal("0.20"))
        assert keeper.state.reservation(kept.reservation_id) is not None


def _two_clocks(
    conn: Client, tmp_path: Path, **kw: Any
) -> tuple[BudgetKeeper, FakeClock, list[float]]:
    """A keeper ($10 a day, ticking every 50 ms) whose wall clock and steady seconds the test
    moves apart: the keeper, its wall clock, and its steady seconds (``[0.0]``, moved in place)."""
    clock, seconds = FakeClock(), [0.0]
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock)
    return BudgetKeeper(rt, tick_s=0.05, steady=lambda: seconds[0], **kw), clock, seconds


async def test_a_wall_clock_stepped_forward_expires_no_hold_whose_time_has_not_passed(
    conn: Client, tmp_path: Path
) -> None:
    """The keeper's clock stepped five minutes forward (NTP, a VM resumed) while a $9 hold's
    call ran: the hold expired, a second $9 was admitted under a $10 day, and both calls billed
    ($18, a review). Holds expire by the wall clock only as far as steady seconds (the boot
    clock) say time has passed since the keeper started."""
    keeper, clock, seconds = _two_clocks(conn, tmp_path, expiry_grace_s=0)
    async with running(keeper):
        held = await reserve(conn, Decimal(9), ttl_s=120)
        assert held.admitted and not (await reserve(conn, Decimal(9))).admitted
        clock.advance(300)  # the step; one second of steady time passes
        seconds[0] += 1
        await anyio.sleep(0.3)  # ticks
        assert keeper.state.reservation(held.reservation_id) is not None
        assert not (await reserve(conn, Decimal(9))).admitted
        seconds[0] += 120  # the hold's time has passed: it expires
        released = await eventually(lambda: events_of(keeper.log, BudgetReleased))
        assert [(e.reservation_id, e.reason) for e, _ in released] == [
            (held.reservation_id, "expired")
        ]
        # Still ahead an hour of steady time later (a clock that was behind at the start, set
        # right): taken as it is, or every hold would expire late by the step for good.
        assert keeper._expiry_now() < clock()
        await anyio.sleep(0.2)  # (ticks: it notes since when)
        seconds[0] += 3600
        clock.advance(3600)  # (the wall clock moves on as well, still five minutes ahead)
        await anyio.sleep(0.2)
        assert keeper._expiry_now() == clock()


async def test_a_second_step_forward_within_the_hour_is_not_trusted_with_the_first(
    conn: Client, tmp_path: Path
) -> None:
    """The wall clock stepped 5 minutes forward, then 10 more 59 minutes later: at the first
    step's hour the keeper took the wall clock as it was, the second step with it, and a hold
    admitted just before that step expired after a minute (a review)."""
    keeper, clock, seconds = _two_clocks(conn, tmp_path)

    def moved(steady_s: float, wall_s: float) -> datetime:
        seconds[0] += steady_s
        clock.advance(wall_s)
        return keeper._expiry_now()

    assert moved(0, 0) == clock()
    assert moved(1, 301) < clock()  # the first step
    assert moved(59 * 60, 59 * 60) < clock()
    assert moved(1, 601) < clock()  # the second
    assert moved(60, 60) < clock()  # the first's hour: not the second's
    assert moved(3600, 3600) == clock()  # the second's hour: taken as it is


async def test_a_wall_clock_stepped_back_at_the_start_does_not_hold_off_every_expiry(
    conn: Client, tmp_path: Path
) -> None:
    """The grace after the start (no hold expires within it) was measured by the wall clock: a
    clock stepped back an hour just after the start kept every hold from expiring for an hour
    (holds admitted after the step too), refusing reservations meanwhile (a review)."""
    keeper, clock, seconds = _two_clocks(conn, tmp_path, expiry_grace_s=15)
    async with running(keeper):
        clock.advance(-3600)
        held = await reserve(conn, Decimal(1), ttl_s=30)
        seconds[0] += 40
        clock.advance(40)
        released = await eventually(lambda: events_of(keeper.log, BudgetReleased))
        assert [(e.reservation_id, e.reason) for e, _ in released] == [
            (held.reservation_id, "expired")
        ]


# --- snapshots -----------------------------------------------------------------------------------


async def test_a_restart_restores_the_snapshot_and_replays_only_the_tail(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rng = random.Random(7)
    make = lambda: BudgetKeeper(  # noqa: E731
        runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock), snapshot_every=50
    )
    first = make()
    async with running(first):
        for n in range(60):
            reply = await reserve(conn, Decimal("0.05"), task_id=f"t{n}")
            if n % 3:
                usage = usage_costing_at_most(Decimal("0.05"), rng)
                await first.log.append(
                    spend(
                        task_id=f"t{n}",
                        usage=usage,
                        at=clock(),
                        reservation_id=reply.reservation_id,
                    )
                )
    assert (tmp_path / SNAPSHOT_FILE).exists()
    at_snapshot = first.state.last_sequence
    for n in range(25):  # more spend while no keeper runs
        usage = usage_costing_at_most(Decimal("0.05"), rng)
        await first.log.append(spend(task_id=f"late{n}", usage=usage, at=clock()))

    second = make()
    async with running(second):
        assert second.restored_sequence == at_snapshot
        assert second.replayed_events == 25
        entries = await read_log(second.log)
        full = budget.catch_up(budget.EMPTY, [(e.event, e.seq) for e in entries])
        assert audit.check_budget([(e.event, e.seq) for e in entries], second.state) == []
        assert second.state.tasks() == full.tasks()
        assert second.state.open_reservations() == full.open_reservations()
        assert second.state.total_spent_usd == full.total_spent_usd == total_spend(entries)

    third = BudgetKeeper(runtime(conn, tmp_path / "elsewhere", cfg=config(), clock=clock))
    async with running(third):  # no snapshot: the whole log
        assert third.restored_sequence is None and third.replayed_events == len(entries)

    (tmp_path / SNAPSHOT_FILE).write_bytes(b"\x93 torn write")
    fourth = make()
    async with running(fourth):  # an unreadable snapshot is ignored, never trusted
        assert fourth.restored_sequence is None and fourth.replayed_events == len(entries)
        assert fourth.state.total_spent_usd == full.total_spent_usd


@pytest.mark.parametrize(
    "written_by", ["an earlier version", "this version", "a snapshot discarded"]
)
async def test_spend_a_keeper_passed_by_unread_is_counted_by_the_keeper_that_reads_it(
    conn: Client, tmp_path: Path, written_by: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An older keeper passes by a newer writer's spend it cannot read, and its snapshot moves
    past it: upgraded, the keeper restored the snapshot and never counted that spend (a review:
    the day short by three calls for good, the limit passable by that much). A snapshot of an
    earlier version is not restored (the log is replayed from its start, once); this version's
    says what it passed by, read again at the next start. (The snapshot that passed a spend by
    is made here by hand: the state of the log without it, at the log's end.)"""
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=FakeClock())
    async with running(BudgetKeeper(rt)) as first:
        await _spend_on_a_reservation(conn, first, Decimal("0.30"))
        await eventually(lambda: _caught_up_with(first))
    saved, passed, without = await _snapshot_without_its_spend(first, tmp_path)
    if written_by == "an earlier version":
        saved.version, saved.passed_by = 1, []
    elif written_by == "this version":
        saved.passed_by = [passed]
    else:  # a snapshot not trusted (of another stream): what it passed by is not read again
        saved.state = budget.snapshot(dataclasses.replace(without, last_sequence=0))
        saved.passed_by, saved.stream_created = [passed], datetime(2020, 1, 1, tzinfo=UTC)
    (tmp_path / SNAPSHOT_FILE).write_bytes(msgspec.msgpack.encode(saved))
    async with running(BudgetKeeper(rt)) as again:
        current = await status(conn)
        assert (current.spent_today_usd, current.open_reservations) == (Decimal("0.30"), 0)
        assert again._passed_by == {}
    read_again = [r for r in caplog.records if "passed by unread before read now" in r.message]
    # (a discarded snapshot's list was read again after the replay had counted the spend: a
    # spend more than a day old, its id no longer remembered, counted twice)
    assert len(read_again) == (written_by == "this version")


async def test_an_audit_that_finds_the_keeper_off_the_log_says_how_to_rebuild_it(
    conn: Client, tmp_path: Path
) -> None:
    """A keeper whose snapshot is wrong (by hand here: a spend left out, as an older keeper's
    could be) differs from the fold of the log; `vapora audit` said so and not what to do."""
    from actors.cost_ledger import CostLedger
    from vapora.cli.money import audit_command

    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=FakeClock())
    async with running(BudgetKeeper(rt)) as first, running(CostLedger(rt)):
        await _spend_on_a_reservation(conn, first, Decimal("0.30"))
        await eventually(lambda: _caught_up_with(first))
    saved, _, _ = await _snapshot_without_its_spend(first, tmp_path)
    (tmp_path / SNAPSHOT_FILE).write_bytes(msgspec.msgpack.encode(saved))
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)):
        code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 1 and "move budget.snapshot out of its data directory" in text, text
    (tmp_path / SNAPSHOT_FILE).rename(tmp_path / "old.snapshot")  # as the audit says
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)):
        code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 0, text


async def test_a_money_message_that_does_not_read_is_remembered_live_and_in_a_replay(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock)
    first = BudgetKeeper(rt)
    async with running(first):
        await first.log.js.publish("vapora.events.spend.x", b"not json")  # a spend subject
        await first.log.js.publish("vapora.events.route", b"not json")  # no money: not kept
        await eventually(lambda: _caught_up_with(first))
        [spend_seq] = list(first._passed_by)
    again = BudgetKeeper(rt)  # from the snapshot, which names it: still unread, still kept
    async with running(again):
        assert list(again._passed_by) == [spend_seq]
    replayed = BudgetKeeper(runtime(conn, tmp_path / "elsewhere", cfg=rt.config, clock=clock))
    async with running(replayed):  # no snapshot: the replay notes it
        assert list(replayed._passed_by) == [spend_seq]


async def test_the_money_subjects_are_under_the_logs_own_prefix(
    conn: Client, tmp_path: Path, unique: str
) -> None:
    """The keeper took its money subjects under the default prefix whatever its log's: on a
    log of another prefix, a spend that did not read was not read again for its money."""
    from actors.eventlog import EventLog, StreamSettings

    settings = StreamSettings(name=f"K_{unique}", prefix=f"k{unique}.events")
    rt = dataclasses.replace(
        runtime(conn, tmp_path, cfg=config(daily_cents=10_000)), log=EventLog(conn, settings)
    )
    keeper = BudgetKeeper(rt)
    async with running(keeper):
        await keeper.log.js.publish(f"k{unique}.events.spend.x", b"not json")
        await eventually(lambda: _caught_up_with(keeper))
        assert len(keeper._passed_by) == 1


async def _spend_on_a_reservation(
    conn: Client, keeper: BudgetKeeper, cost: Decimal, ttl_s: float = 120.0
) -> None:
    """A reservation of $1 admitted by ``keeper`` and settled by a spend of ``cost`` appended
    to its log at its clock's time."""
    held = await reserve(conn, Decimal(1), task_id="t1", ttl_s=ttl_s)
    usage = exact_usage(cost)
    await keeper.log.append(
        spend(task_id="t1", usage=usage, at=keeper.clock(), reservation_id=held.reservation_id)
    )


async def _snapshot_without_its_spend(
    keeper: BudgetKeeper, data_dir: Path
) -> tuple[Any, int, budget.BudgetState]:
    """``keeper``'s snapshot (stopped: written) made to pass by its log's one spend, as an
    older keeper could: ``(the snapshot file, the spend's sequence, the state without it)``;
    the caller writes it back."""
    from actors import budget_keeper as module

    entries = await read_log(keeper.log)
    [passed] = [e.seq for e in entries if isinstance(e.event, SpendRecorded)]
    without = budget.catch_up(budget.EMPTY, [(e.event, e.seq) for e in entries if e.seq != passed])
    saved = msgspec.msgpack.decode(
        (data_dir / SNAPSHOT_FILE).read_bytes(), type=module._SnapshotFile
    )
    saved.state = budget.snapshot(dataclasses.replace(without, last_sequence=entries[-1].seq))
    return saved, passed, without


async def _caught_up_with(keeper: BudgetKeeper) -> bool:
    return keeper.state.last_sequence == await keeper.log.last_sequence()


async def test_the_keeper_keeps_an_idle_task_as_long_as_its_config_says_across_a_restart(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    cfg = config(daily_cents=10_000)
    cfg = msgspec.structs.replace(
        cfg, budget=msgspec.structs.replace(cfg.budget, task_retention_hours=72.0)
    )
    make = lambda: BudgetKeeper(  # noqa: E731
        runtime(conn, tmp_path, cfg=cfg, clock=clock), snapshot_every=5
    )
    first = make()
    async with running(first):
        for n in range(6):
            await reserve(conn, Decimal("0.01"), task_id=f"t{n}")
        assert first.state.task_retention == timedelta(hours=72)
    second = make()
    async with running(second):  # from its snapshot, which does not carry it: the config does
        assert second.restored_sequence is not None
        assert second.state.task_retention == timedelta(hours=72)


async def test_a_snapshot_of_another_stream_of_the_same_name_is_not_trusted(
    conn: Client, tmp_path: Path
) -> None:
    """The stream made again (or the data directory pointed at another server): the snapshot
    was checked only against the stream's name and length, so a new stream at least as long had
    the old state mixed into it."""
    clock = FakeClock()
    make = lambda: BudgetKeeper(  # noqa: E731
        runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock), snapshot_every=5
    )
    first = make()
    async with running(first):
        for n in range(10):
            await first.log.append(
                spend(task_id=f"old{n}", usage=exact_usage(Decimal("0.3")), at=clock())
            )
        await eventually(lambda: _at_end(first))
    assert (tmp_path / SNAPSHOT_FILE).exists()
    await first.log.js.delete_stream(first.log.settings.name)
    await first.log.ensure_stream()  # made again: empty, and then longer than before
    for n in range(15):
        await first.log.append(
            spend(task_id=f"new{n}", usage=exact_usage(Decimal("0.03")), at=clock())
        )
    second = make()
    async with running(second):
        assert second.restored_sequence is None
        assert second.state.total_spent_usd == Decimal("0.45")  # the new stream's spend alone
        assert second.state.task("old0") is None


# --- malformed requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "body", "named"),
    [
        (subjects.BUDGET_RESERVE, b"{not json", "malformed JSON"),
        (subjects.BUDGET_RESERVE, b'{"reservation_id": "r"}', "missing required field"),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"t","provider":"p","amount_usd":"-1"}',
            "amount_usd",
        ),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"t","provider":"p","amount_usd":"NaN"}',
            "amount_usd",
        ),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"t","provider":"p","amount_usd":"1","ttl_s":0}',
            "ttl_s",
        ),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"","task_id":"t","provider":"p","amount_usd":"1"}',
            "reservation_id",
        ),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"t","provider":"p","amount_usd":"1","x":1}',
            "unknown field `x`",
        ),
        (  # stored, this amount overflowed the fold and the keeper could not start again
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"t","provider":"p","amount_usd":"1E+1000000"}',
            "`amount_usd` must be a finite, non-negative decimal of at most",
        ),
        (
            subjects.BUDGET_RESERVE,
            b'{"reservation_id":"r","task_id":"\xff\xfe","provider":"p","amount_usd":"1"}',
            "not UTF-8",
        ),
        (subjects.BUDGET_RELEASE, b'{"reservation_id": 5, "reason": "failed"}', "reservation_id"),
        (subjects.BUDGET_RELEASE, b'{"reservation_id": "r", "reason": "bored"}', "reason"),
        (  # a 100 KB value was repeated whole in the answer and in $SRV.STATS
            subjects.BUDGET_RELEASE,
            b'{"reservation_id": "r", "reason": "' + b"x" * 100_000 + b'"}',
            "... (100000 characters)",
        ),
        (subjects.BUDGET, b'{"verbose": true}', "unknown field `verbose`"),
        (subjects.BUDGET, b"[]", "object"),
    ],
)
async def test_malformed_requests_get_400_and_leave_the_state_unchanged(
    conn: Client, tmp_path: Path, subject: str, body: bytes, named: str
) -> None:
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100)))
    async with running(keeper):
        held = await reserve(conn, Decimal("0.10"))
        before, last = await status(conn), await keeper.log.last_sequence()
        # An empty body asks for the status as `{}` does (`nats req vapora.budget ""` was a 400).
        assert (await ask(conn, subjects.BUDGET, b"")).as_(BudgetStatus) == before
        answer = await ask(conn, subject, body)
        assert answer.status == "400"
        assert answer.error().error.code == "invalid_request"
        assert named in answer.error().error.message
        assert len(answer.error().error.message) < 1000
        assert await status(conn) == before
        assert await keeper.log.last_sequence() == last
        assert keeper.state.reservation(held.reservation_id) is not None


async def test_a_message_that_is_no_event_on_the_keepers_subject_does_not_fence_it_out(
    conn: Client, tmp_path: Path
) -> None:
    """Something outside vapora publishes on the keeper's single-writer subject: the keeper
    passes it by and its next fenced append expects it (it waited for a position it never
    reached, and refused every reservation with 503)."""
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100)))
    async with running(keeper):
        await reserve(conn, Decimal("0.10"))
        await conn.publish(keeper.subject, b'{"type": "not an event"}')
        await conn.flush()
        await eventually(lambda: _at_end(keeper))
        held = await reserve(conn, Decimal("0.10"))
        assert held.admitted
        assert keeper.log.unreadable


@pytest.mark.parametrize("cost", ["NaN", "-Infinity", "-5"])
async def test_a_stored_spend_no_sum_can_take_is_passed_by_live_and_at_restart(
    conn: Client, tmp_path: Path, cost: str
) -> None:
    """A spend stored with a NaN cost stopped the keeper for good (its tier comparison raised at
    every start), and a negative or infinite one lowered the spend every limit counts."""
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100)))
    good = spend(task_id="T-good", usage=exact_usage(Decimal("0.30")), at=NOON)
    bad = msgspec.json.decode(
        encode(spend(task_id="T-bad", usage=exact_usage(Decimal("0.03")), at=NOON))
    )
    bad["cost_usd"] = cost
    async with running(keeper):
        await keeper.log.append(good)
        await conn.publish(
            subjects.event_subject("spend_recorded", "claude"), msgspec.json.encode(bad)
        )
        await conn.flush()
        await eventually(lambda: _at_end(keeper))
        assert (await status(conn)).spent_today_usd == Decimal("0.30")
        [problem] = keeper.log.unreadable.values()
        assert "`cost_usd` must be a finite, non-negative decimal" in problem
    again = BudgetKeeper(runtime(conn, tmp_path / "again", cfg=config(daily_cents=100)))
    async with running(again):
        assert (await status(conn)).spent_today_usd == Decimal("0.30")
        assert (await reserve(conn, Decimal("0.10"))).admitted


async def _at_end(keeper: BudgetKeeper) -> bool:
    return keeper.state.last_sequence == await keeper.log.last_sequence()


async def test_an_event_stamped_ahead_of_the_keepers_clock_is_said_and_prunes_nothing(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider host whose clock is far ahead: the keeper names it (the spend bills the day
    it names), and today's spend still counts against today's limit."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock))
    async with running(keeper):
        await keeper.log.append(spend(task_id="T-now", usage=exact_usage(Decimal("6")), at=clock()))
        ahead = spend(
            task_id="T-ahead", usage=exact_usage(Decimal("0.03")), at=clock() + timedelta(days=90)
        )
        with caplog.at_level(logging.WARNING, logger="vapora.budget"):
            await keeper.log.append(ahead)
            await eventually(lambda: _at_end(keeper))
        assert keeper.ahead == 1
        assert f"spend_recorded {ahead.id} is stamped" in caplog.text
        assert "ahead of this keeper's clock" in caplog.text
        now = await status(conn)
        assert now.spent_today_usd == Decimal(6) and now.tier is Tier.NEAR_THRESHOLD


async def test_a_spend_stamped_before_its_reservation_was_admitted_is_said(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider actor whose clock is a day behind: its spend counts in the day it names, a
    day no limit checks any more (DESIGN §4; a review: $180 spent under a $10 day). Nothing
    said it; the keeper names a spend stamped before its own reservation was admitted."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock))
    async with running(keeper):
        held = await reserve(conn, Decimal(9), task_id="T-behind")
        behind = spend(
            task_id="T-behind",
            usage=exact_usage(Decimal(9)),
            at=clock() - timedelta(days=1),
            reservation_id=held.reservation_id,
        )
        on_time = await reserve(conn, Decimal("0.03"), task_id="T-on-time")
        with caplog.at_level(logging.WARNING, logger="vapora.budget"):
            await keeper.log.append(behind)
            await keeper.log.append(
                spend(
                    task_id="T-on-time",
                    usage=exact_usage(Decimal("0.03")),
                    at=clock() - timedelta(seconds=2),  # (a clock a little behind: not said)
                    reservation_id=on_time.reservation_id,
                )
            )
            await eventually(lambda: _at_end(keeper))
        assert keeper.behind == 1
        assert f"spend {behind.id} is stamped" in caplog.text
        assert "before its reservation" in caplog.text


async def test_an_event_stamped_without_an_offset_is_folded_not_a_stall(
    conn: Client, tmp_path: Path
) -> None:
    """The contract says UTC and the fold takes a naive time at its word; the keeper's clock
    check compared it with an aware one and raised, so its tail retried that event forever and
    counted no spend after it."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock))
    async with running(keeper):
        naive = spend(
            task_id="T-naive", usage=exact_usage(Decimal("0.15")), at=clock().replace(tzinfo=None)
        )
        await keeper.log.append(naive)
        for n in range(3):
            await keeper.log.append(
                spend(task_id=f"T{n}", usage=exact_usage(Decimal("0.30")), at=clock())
            )
        await eventually(lambda: _at_end(keeper))
        now = await status(conn)
        assert now.spent_today_usd == Decimal("1.05") and now.tier is Tier.EXCEEDED


async def test_a_spend_past_its_reservation_is_said_and_counted(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reservation is meant to be the attempt's upper bound; a spend past it (an estimate
    that fell short) went by without a word."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock))
    async with running(keeper):
        hold = await reserve(conn, Decimal("0.000003"), task_id="T-over")
        over = spend(
            task_id="T-over",
            usage=exact_usage(Decimal("0.000006")),
            at=clock(),
            reservation_id=hold.reservation_id,
        )
        await keeper.log.append(over)
        await eventually(lambda: _caught_up(keeper))
        assert keeper.overruns == 1
        assert any("past the $0.000003 its reservation" in r.getMessage() for r in caplog.records)


async def test_a_hold_said_pending_again_is_the_last_the_keeper_forgets(
    conn: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its bound the keeper forgot the pending word heard first, not the one heard least
    recently: a hold a provider actor kept announcing (its spend still held) lost its
    protection while holds never announced again were kept."""
    import types

    import actors.budget_keeper as keeper_module
    from events.contract import BudgetPending

    monkeypatch.setattr(keeper_module, "_PENDING_REMEMBERED", 3)
    keeper = BudgetKeeper(runtime(conn, tmp_path))

    async def say(*holds: str) -> None:
        await keeper._on_pending(types.SimpleNamespace(data=encode(BudgetPending(holds=[*holds]))))

    for hold in ("a", "b", "c", "a", "d"):  # "a" said again before "d"
        await say(hold)
    assert set(keeper._pending) == {"c", "a", "d"}
    await keeper._on_pending(types.SimpleNamespace(data=b"not json"))  # passed by, logged
    assert set(keeper._pending) == {"c", "a", "d"}


# --- a hold given back after its spend ----------------------------------------------------------


def _lagging(keeper: BudgetKeeper, seconds: float = 0.05) -> None:
    """Make the keeper's tail fold each live batch ``seconds`` late (as when it is busy with a
    batch of other events, or its follower reconnects)."""
    fold = keeper._apply_tail

    async def late(batch: list[Any]) -> None:
        await anyio.sleep(seconds)
        await fold(batch)

    keeper._apply_tail = late  # type: ignore[method-assign]


async def test_a_hold_due_is_expired_only_after_the_log_is_read_to_its_end(
    conn: Client, tmp_path: Path
) -> None:
    """A hold's spend in the log but not yet folded (the tail late) when the hold falls due:
    expired first, its money was neither held nor spent until the spend landed, and a
    reservation admitted meanwhile could pass the limit. The keeper reads the log to its end
    before it expires a hold: the spend settles it, and no expiry is written."""
    clock = FakeClock()
    keeper = BudgetKeeper(
        runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock), tick_s=0.05
    )
    _lagging(keeper, 0.5)
    async with running(keeper):
        await _spend_on_a_reservation(conn, keeper, Decimal("0.30"), ttl_s=30)
        clock.advance(31)  # due now; its spend is in the log, folded half a second later
        await eventually(lambda: _caught_up_with(keeper))
        await anyio.sleep(0.2)  # (more ticks)
        assert await events_of(keeper.log, BudgetReleased) == []
        assert (await status(conn)).spent_today_usd == Decimal("0.30")


async def test_a_release_after_a_billed_failure_folds_its_spend_first_so_the_limit_holds(
    conn: Client, tmp_path: Path
) -> None:
    """A failed call the provider billed: the provider actor appends its spend, then answers
    the failure, and the router releases the hold. The keeper closed the hold at once, before
    its tail had folded that spend: meanwhile the money was neither held nor spent, and a
    reservation admitted then passed the day's limit ($1.20 spent of $1.00, in a review)."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock))
    _lagging(keeper)
    async with running(keeper):
        first = await reserve(conn, Decimal("0.60"), task_id="billed")
        assert first.admitted
        billed = spend(
            task_id="billed",
            usage=exact_usage(Decimal("0.60")),
            at=clock(),
            reservation_id=first.reservation_id,
        )
        await keeper.log.append(billed)
        await release(conn, first.reservation_id, "failed")
        second = await reserve(conn, Decimal("0.60"), task_id="next")
        assert not second.admitted  # $0.40 is what is left of the day
        now = await status(conn)
        assert (now.spent_today_usd, now.open_reservations) == (Decimal("0.60"), 0)


async def test_a_lease_returned_after_its_spend_is_closed_as_a_replay_closes_it(
    conn: Client, tmp_path: Path
) -> None:
    """A lease returned keeping what it spent, its spend not yet folded by the tail: the live
    keeper kept the lease open (returned, nothing outstanding) until it expired, where a fold
    of the log closes it, so an audit in that window found the keeper and the log apart."""
    from events.contract import BudgetLeaseReply, BudgetLeaseRequest, BudgetLeaseReturn

    clock = FakeClock()
    keeper = BudgetKeeper(
        runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock), tick_s=3600
    )
    _lagging(keeper)
    lease_id = uuid.uuid4().hex
    async with running(keeper):
        asked = BudgetLeaseRequest(lease_id=lease_id, holder="router-1", min_usd=Decimal("0.10"))
        granted = (await ask(conn, subjects.BUDGET_LEASE, asked)).as_(BudgetLeaseReply)
        assert granted.granted
        await eventually(lambda: _caught_up(keeper))
        used = spend(
            task_id="leased",
            usage=exact_usage(Decimal("0.30")),
            at=clock(),
            reservation_id=lease_id,
        )
        await keeper.log.append(used)
        back = BudgetLeaseReturn(lease_id=lease_id, holder="router-1", kept_usd=Decimal("0.30"))
        await ask(conn, subjects.BUDGET_LEASE_RETURN, back)
        now = await status(conn)
        assert (now.open_leases, now.leased_usd, now.spent_today_usd) == (0, 0, Decimal("0.30"))
        await eventually(lambda: _caught_up(keeper))
        live = keeper.state
    entries = await read_log(keeper.log)
    assert audit.check_budget([(e.event, e.seq) for e in entries], live) == []


async def test_give_backs_wait_for_the_tail_side_by_side_and_reservations_do_not_wait(
    conn: Client, tmp_path: Path
) -> None:
    """A give-back waits for the tail to read the log to its end. Waiting under the keeper's
    lock, each waited for the one before's own append and every reservation waited behind
    them (20 give-backs a second with the tail 50 ms behind); and of two waiting at once, the
    first was never woken (each waiter replaced the other's event)."""
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock))
    opened = anyio.Event()
    opened.set()
    gate = [opened]  # the tail folds each batch once gate[0] is set
    fold = keeper._apply_tail

    async def held_back(batch: list[Any]) -> None:
        await gate[0].wait()
        await fold(batch)

    keeper._apply_tail = held_back  # type: ignore[method-assign]
    async with running(keeper):
        holds = [await reserve(conn, Decimal("0.01"), task_id=f"t{i}") for i in range(2)]
        await eventually(lambda: _caught_up(keeper))
        gate[0] = anyio.Event()  # closed: the tail reads nothing more until it is set
        await keeper.log.append(
            spend(task_id="t0", usage=exact_usage(Decimal("0.003")), at=clock())
        )
        answered: list[str] = []
        with anyio.fail_after(10), contextlib.ExitStack() as opened_at_the_end:
            # However it fails, the tail is let go: the keeper must be able to stop.
            opened_at_the_end.callback(lambda: gate[0].set())
            await _side_by_side(conn, holds, answered, gate)
        assert sorted(answered) == sorted(h.reservation_id for h in holds)


async def _side_by_side(
    conn: Client, holds: list[BudgetReserveReply], answered: list[str], gate: list[anyio.Event]
) -> None:
    async with anyio.create_task_group() as tg:

        async def give_back(rid: str) -> None:
            answer = await release(conn, rid, "failed")
            assert answer.status is None, answer
            answered.append(rid)

        for hold in holds:
            tg.start_soon(give_back, hold.reservation_id)
        await anyio.sleep(0.2)  # both are waiting for the tail now
        # A reservation is answered meanwhile: no give-back holds the lock while it waits.
        assert (await reserve(conn, Decimal("0.01"), task_id="t2", wait_s=1.0)).admitted
        assert answered == []
        gate[0].set()  # the tail moves: both give-backs go on


@pytest.mark.parametrize("off_by", [timedelta(days=1), timedelta(hours=-2), timedelta(0)])
async def test_a_keeper_clock_off_the_nats_servers_is_said_at_error(
    conn: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture, off_by: timedelta
) -> None:
    """A keeper whose clock is a day ahead admits against an empty day while the day's spend
    goes on: nothing compared its clock with another. It compares the time it stamped on an
    event it wrote with the time the server stored it at, and says a difference past a minute
    (a clock right by the server's: nothing said)."""

    def clock() -> datetime:
        return utc_now() + off_by

    rt = runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock)
    keeper = BudgetKeeper(rt, tick_s=0.05, check_clock=True)
    async with running(keeper):
        with caplog.at_level(logging.INFO, logger="vapora.budget"):
            assert (await reserve(conn, Decimal("0.10"), task_id="T-clock")).admitted

            async def compared() -> bool:
                return keeper.clock_skew is not None

            await eventually(compared)
    assert keeper.clock_skew is not None
    assert abs(keeper.clock_skew - off_by) < timedelta(seconds=5)
    said = [r for r in caplog.records if "the NATS server's" in r.getMessage()]
    if off_by:
        [record] = said
        assert record.levelno == logging.ERROR
        where = "ahead of" if off_by > timedelta(0) else "behind"
        seconds = f"{abs(off_by.total_seconds()):,.0f} s"
        assert f"its clock is {seconds} {where} the NATS server's" in record.getMessage()
    else:
        assert not said
