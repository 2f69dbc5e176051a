"""Budget leases on a real nats-server: the keeper grants, extends, takes back and expires leases
as events; routers admit paid attempts against them locally; two routers with leases under 500
concurrent paid requests never overspend the daily limit."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.budget_keeper import BudgetKeeper
from actors.connection import Client, ConnectOptions, PermissionDenied, connect
from actors.router import RouterActor
from actors.server import EmbeddedNats
from events import subjects
from events.codec import decode, encode
from events.contract import (
    BudgetCaps,
    BudgetCapsRequest,
    BudgetLeaseReply,
    BudgetLeaseRequest,
    BudgetLeaseReturn,
    BudgetReserve,
)
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReserved,
    FallbackTriggered,
    SpendRecorded,
)
from tests.fault.money import (
    NOON,
    FakeClock,
    ask,
    config,
    events_of,
    eventually,
    exact_usage,
    read_log,
    reserve,
    running,
    runtime,
    spend,
    status,
)
from tests.fault.provider_harness import (
    config_text,
    deployment,
    make_config,
    until,
    wait_until_served,
)
from vapora import audit, budget
from vapora.errors import BudgetExceeded, VaporaError

pytestmark = pytest.mark.anyio


async def lease(
    nc: Client, lease_id: str | None = None, holder: str = "router-a", min_usd: str = "0"
) -> BudgetLeaseReply:
    request = BudgetLeaseRequest(
        lease_id=lease_id or uuid.uuid4().hex, holder=holder, min_usd=Decimal(min_usd)
    )
    return (await ask(nc, subjects.BUDGET_LEASE, request)).as_(BudgetLeaseReply)


async def give_back(nc: Client, lease_id: str, kept: str, holder: str = "router-a") -> None:
    request = BudgetLeaseReturn(lease_id=lease_id, holder=holder, kept_usd=Decimal(kept))
    (await ask(nc, subjects.BUDGET_LEASE_RETURN, request)).as_(BudgetLeaseReply)


# --- the keeper ----------------------------------------------------------------------------------


async def test_a_lease_is_an_event_before_the_reply_spend_draws_it_down_and_a_return_frees_it(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock))
    async with running(keeper):
        granted = await lease(conn)
        assert granted.granted and granted.granted_usd == Decimal("1.00")  # the $1 default cap
        logged = await events_of(keeper.log, BudgetLeased)
        assert [(e.lease_id, e.granted_usd, e.version) for e, _ in logged] == [
            (granted.lease_id, Decimal("1.00"), 1)
        ]
        assert (await status(conn)).leased_usd == Decimal("1.00")
        # A reservation now competes with the lease for the $10: $9 is all that is left.
        assert not (await reserve(conn, Decimal("9.01"))).admitted
        await keeper.log.append(
            spend(
                task_id="t1",
                usage=exact_usage(Decimal("0.30")),
                at=clock(),
                reservation_id=granted.lease_id,
            )
        )
        await eventually(lambda: _leased_is(conn, Decimal("0.70")))
        extended = await lease(conn, granted.lease_id)
        assert extended.granted and extended.granted_usd == Decimal("1.30")  # back to $1 open
        await give_back(conn, granted.lease_id, kept="0.30")
        current = await status(conn)
        assert (current.leased_usd, current.open_leases) == (Decimal(0), 0)
        assert current.spent_today_usd == Decimal("0.30")
        assert not (await lease(conn, granted.lease_id)).granted  # a returned lease stays closed
        entries = await read_log(keeper.log)
        await eventually(lambda: _caught_up(keeper))
    returned = [e.event for e in entries if isinstance(e.event, BudgetLeaseReturned)]
    assert [(e.reason, e.kept_usd) for e in returned] == [("returned", Decimal("0.30"))]
    assert audit.check_budget([(e.event, e.seq) for e in entries], keeper.state) == []


async def _leased_is(nc: Client, amount: Decimal) -> bool:
    return (await status(nc)).leased_usd == amount


async def test_a_dead_holders_lease_expires_and_its_money_is_free_again(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    keeper = BudgetKeeper(
        runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock), tick_s=0.05
    )
    async with running(keeper):
        granted = await lease(conn)
        await anyio.sleep(0.2)
        assert (await status(conn)).open_leases == 1  # time has not moved
        clock.advance(301)
        expired = await eventually(lambda: events_of(keeper.log, BudgetLeaseReturned))
        assert [(e.lease_id, e.reason) for e, _ in expired] == [(granted.lease_id, "expired")]
        assert (await status(conn)).leased_usd == 0


async def test_leases_shrink_near_the_limit_and_none_is_granted_when_exceeded(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=100), clock=clock))

    async def spent(cost: str) -> None:
        usage = exact_usage(Decimal(cost))
        await keeper.log.append(spend(task_id=uuid.uuid4().hex, usage=usage, at=clock()))
        await eventually(lambda: _caught_up(keeper))

    async with running(keeper):
        first = await lease(conn, holder="router-a")
        assert first.granted_usd == Decimal("0.25")  # half the way to 50 % of $1
        second = await lease(conn, holder="router-b")
        assert second.granted_usd == Decimal("0.0625")  # half of what is left, split in two
        await give_back(conn, first.lease_id, "0")
        await give_back(conn, second.lease_id, "0", holder="router-b")
        await spent("0.87")  # 87 %: 3 cents below the warn line
        near = await lease(conn, min_usd="0.01")
        assert near.granted and near.granted_usd == Decimal("0.015"), near
        await give_back(conn, near.lease_id, "0")
        refused = await lease(conn, min_usd="0.02")
        assert not refused.granted and "no lease of at least $0.02" in refused.reason
        await spent("0.06")  # 93 %: Exceeded
        exceeded = await lease(conn)
        assert not exceeded.granted and "Exceeded" in exceeded.reason


async def _caught_up(keeper: BudgetKeeper) -> bool:
    return keeper.state.last_sequence == await keeper.log.last_sequence()


async def test_a_restarted_keeper_rebuilds_open_leases_from_the_log(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    make = lambda: BudgetKeeper(  # noqa: E731
        runtime(conn, tmp_path, cfg=config(daily_cents=1000), clock=clock)
    )
    async with running(make()):
        granted = await lease(conn)
    async with running(make()) as again:
        assert (await status(conn)).leased_usd == granted.granted_usd
        extended = await lease(conn, granted.lease_id)
        assert extended.granted_usd == granted.granted_usd  # its $1 cap is still outstanding
        assert again.state.lease(granted.lease_id) is not None


# --- routers holding leases ----------------------------------------------------------------------


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


async def test_two_routers_with_leases_and_500_concurrent_paid_requests_never_overspend(
    tmp_path: Path,
) -> None:
    models = {"claude": "claude-opus-4-5-len-100", "openai": "gpt-4-len-100"}
    limit = Decimal("0.085")
    budget_toml = "[budget]\ndaily_limit_cents = 8.5\nlease_cents = 3\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        second = RouterActor(dep.runtime, reserve=True)
        results, refused = [], []

        async def one(i: int) -> None:
            try:
                results.append(
                    await dep.client.complete(
                        prompt=f"write function number {i}",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=100,
                    )
                )
            except BudgetExceeded as error:
                refused.append(error)

        async with anyio.create_task_group() as routers:
            await routers.start(second.run)
            await wait_until_served(dep.client.nc, "vapora.complete")
            first = dep.router
            assert first is not None
            await until(lambda: first.lease is not None and second.lease is not None)
            with anyio.fail_after(80):
                async with anyio.create_task_group() as tg:
                    for i in range(500):
                        tg.start_soon(one, i)
            second.stop()
        events = await dep.events()

    assert len(results) + len(refused) == 500
    spends = [e for e in events if isinstance(e, SpendRecorded)]
    paid = sum((e.cost_usd for e in spends), Decimal(0))
    assert paid <= limit
    assert sum((r.cost_usd for r in results), Decimal(0)) == paid
    served_paid = [r for r in results if r.provider != "ollama"]
    # Some paid: how many fit depends on which paid model served them and how the calls
    # interleaved, never more than the limit buys at the cheapest price seen.
    assert len(served_paid) >= 20
    assert len(served_paid) <= limit / min(r.cost_usd for r in served_paid)
    leases = [e for e in events if isinstance(e, BudgetLeased)]
    assert {e.holder for e in leases} == {first.holder, second.holder}
    lease_ids = {e.lease_id for e in leases}
    on_leases = [e for e in spends if e.reservation_id in lease_ids]
    assert len(on_leases) >= 10  # admitted locally, no round trip each
    gave_back = {e.holder for e in events if isinstance(e, BudgetLeaseReturned)}
    assert {first.holder, second.holder} <= gave_back  # at Exceeded, or the second when it stopped
    # At every point of the log, spend plus reservations plus leases stayed within the limit.
    state = budget.EMPTY
    for event in events:
        state = budget.evolve(state, event)
        assert state.spent_on(NOON.date()) <= limit
        assert max(state.days.values(), default=Decimal(0)) + state.committed_usd <= limit


async def test_a_router_admits_paid_attempts_on_its_lease_and_returns_the_rest_when_it_stops(
    tmp_path: Path,
) -> None:
    models = {"claude": "claude-opus-4-5-len-100"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        for i in range(5):
            result = await dep.client.complete(
                prompt=f"write function number {i}",
                task_type="CodeGeneration",
                quality="High",
                max_tokens=100,
            )
            assert result.provider == "claude"
        router.stop()
        await until(lambda: router.lease is None)
        events = await dep.events()
        final = await status(dep.client.nc)  # type: ignore[arg-type]
    leased = [e for e in events if isinstance(e, BudgetLeased)]
    assert len(leased) == 1 and leased[0].granted_usd == Decimal(1)  # $1: the default size
    spends = [e for e in events if isinstance(e, SpendRecorded)]
    assert [e.reservation_id for e in spends] == [leased[0].lease_id] * 5  # no reservation each
    assert not [e for e in events if type(e).__name__ == "BudgetReserved"]
    returned = [e for e in events if isinstance(e, BudgetLeaseReturned)]
    assert [(e.reason, e.kept_usd) for e in returned] == [
        ("returned", sum((e.cost_usd for e in spends), Decimal(0)))
    ]
    assert (final.leased_usd, final.open_leases) == (Decimal(0), 0)


async def test_a_lease_revoked_with_attempts_in_flight_keeps_only_what_they_cost(
    tmp_path: Path,
) -> None:
    """The tier reaching Exceeded revokes the router's lease while an attempt runs on it: the
    return keeps that attempt's upper bound, and once the attempt ends the router returns the
    lease again keeping what it cost, so the rest of the bound is free at once (it stayed
    committed until the lease expired)."""
    models = {"claude": "claude-opus-4-5-len-20-slow-1000"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        held = router.lease
        assert held is not None
        async with anyio.create_task_group() as tg:
            results: list[object] = []

            async def call() -> None:
                results.append(
                    await dep.client.complete(
                        prompt="write a function",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=2000,
                        task_id="in-flight",
                    )
                )

            tg.start_soon(call)
            await until(lambda: held.committed > 0)  # admitted on the lease, running
            other = spend(  # another router's spend takes the day past the warn threshold
                task_id="elsewhere",
                usage=exact_usage(Decimal("9.3")),
                at=datetime.now(UTC),
                cost_usd=Decimal("9.3"),
            )
            await dep.log.append(other)
            await until(lambda: router.lease is None)  # revoked, the attempt still running
        [result] = results
        assert result.provider == "claude"  # type: ignore[attr-defined]

        async def closed() -> bool:
            return (await status(dep.client.nc)).leased_usd == 0  # type: ignore[arg-type]

        await eventually(closed, within=10)
        events = await dep.events()
    returns = [e for e in events if isinstance(e, BudgetLeaseReturned)]
    [cost] = [
        e.cost_usd for e in events if isinstance(e, SpendRecorded) and e.task_id == "in-flight"
    ]
    assert [e.reason for e in returns] == ["revoked", "returned"]
    assert returns[0].kept_usd > cost  # the attempt's bound, while it ran
    assert returns[1].kept_usd == cost


async def test_a_malformed_lease_reply_leaves_the_router_serving_and_reserving_per_attempt(
    tmp_path: Path,
) -> None:
    models = {"claude": "claude-opus-4-5-len-100"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        asked = anyio.Event()

        async def garbage(msg: Any) -> None:
            asked.set()
            await msg.respond(b'{"granted": "certainly", "lease_id": 7}')

        # The keeper stops answering leases; something else answers them with nonsense.
        keeper_lease = next(
            sid for sid, sub in dep.nc._subs.items() if sub.subject == subjects.BUDGET_LEASE
        )
        await dep.nc._subs[keeper_lease].unsubscribe()
        await dep.nc.subscribe(subjects.BUDGET_LEASE, cb=garbage)
        router.lease = None  # as if it had been given back: the next paid attempt asks again
        first = await dep.client.complete(
            prompt="write a function", task_type="CodeGeneration", quality="High", max_tokens=100
        )
        with anyio.fail_after(10):
            await asked.wait()
        second = await dep.client.complete(
            prompt="write another", task_type="CodeGeneration", quality="High", max_tokens=100
        )
        events = await dep.events()
    assert (first.provider, second.provider) == ("claude", "claude")
    assert router.lease is None
    spends = [e for e in events if isinstance(e, SpendRecorded)]
    reserved = {e.reservation_id for e in events if type(e).__name__ == "BudgetReserved"}
    assert len(spends) == 2 and {e.reservation_id for e in spends} <= reserved


async def test_a_router_that_cannot_read_the_keepers_caps_takes_no_lease_until_it_can(
    tmp_path: Path,
) -> None:
    """Without the caps the keeper enforces, a lease would admit a task's request naming no cap
    past its cap: a router whose caps request fails (nonsense here; an older keeper without the
    endpoint: no responders) serves, every paid attempt reserved with the keeper, and takes a
    lease once the caps come."""
    models = {"claude": "claude-opus-4-5-len-100"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        assert dep.router is not None
        dep.router.stop()
        answers = [b'{"caps": "none"}']

        async def stand_in(msg: Any) -> None:
            await msg.respond(answers[0])

        keeper_caps = next(
            sid for sid, sub in dep.nc._subs.items() if sub.subject == subjects.BUDGET_CAPS
        )
        await dep.nc._subs[keeper_caps].unsubscribe()
        await dep.nc.subscribe(subjects.BUDGET_CAPS, cb=stand_in)
        again = RouterActor(dep.runtime, reserve=True)
        async with anyio.create_task_group() as tg:
            await tg.start(again.run)
            ask_ = {"prompt": "hello", "provider": "claude", "max_tokens": 100}
            first = await dep.client.complete(**ask_)
            assert again.lease is None and not again._caps_read
            answers[0] = b'{"caps": []}'
            with anyio.fail_after(10):
                while again.lease is None:  # a paid attempt asks again, past the retry's wait
                    await dep.client.complete(**ask_)
                    await anyio.sleep(0.2)
            again.stop()
        events = await dep.events()
    reserved = {e.reservation_id for e in events if type(e).__name__ == "BudgetReserved"}
    [spent] = [e for e in events if isinstance(e, SpendRecorded) and e.task_id == first.task_id]
    assert spent.reservation_id in reserved  # reserved with the keeper, not on a lease


async def test_a_router_refused_the_caps_subject_says_so_once_and_reserves_per_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Permissions generated before ``vapora.budget.caps`` (a rolling upgrade): the server
    refuses the router's request. That escaped the router's read: an ERROR and a traceback per
    paid attempt, each asking again at once. (The refusal is the connection's, as a secured
    server's would be: tests/cluster/test_permissions.py has the real one.)"""
    models = {"claude": "claude-opus-4-5-len-100"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        assert dep.router is not None
        dep.router.stop()
        real_request = dep.nc.request
        asked: list[str] = []

        async def request(subject: str, *args: Any, **kw: Any) -> Any:
            if subject == subjects.BUDGET_CAPS:
                asked.append(subject)
                raise PermissionDenied(f'permissions violation for publish to "{subject}"')
            return await real_request(subject, *args, **kw)

        monkeypatch.setattr(dep.nc, "request", request)
        again = RouterActor(dep.runtime, reserve=True)
        async with anyio.create_task_group() as tg:
            await tg.start(again.run)
            for _ in range(5):
                await dep.client.complete(prompt="hello", provider="claude", max_tokens=100)
            again.stop()
    assert again.lease is None and 1 <= len(asked) <= 2  # (then a second's wait, doubling)
    warned = [r for r in caplog.records if "budget.caps" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_router_whose_clock_is_behind_the_keepers_keeps_to_the_lease_the_keeper_holds(
    tmp_path: Path,
) -> None:
    """A lease's expiry is the keeper's clock: a router two minutes behind it took the keeper's
    expiry as its own and admitted on a lease the keeper had already expired and freed ($1.107
    spent of a $1.00 day in a review). The router times a lease by its own clock from when it
    asked, and drops a lease the keeper no longer holds when it asks to extend it."""
    models = {"claude": "claude-opus-4-5-len-100"}
    budget_toml = "[budget]\ndaily_limit_cents = 1000\n"
    async with deployment(tmp_path, guide(models=models, budget=budget_toml), keeper=True) as dep:
        assert dep.router is not None
        dep.router.stop()
        behind = timedelta(minutes=2)
        keeper_clock = dep.runtime.clock
        router_clock = lambda: keeper_clock() - behind  # noqa: E731
        late = RouterActor(dataclasses.replace(dep.runtime, clock=router_clock), reserve=True)
        async with anyio.create_task_group() as tg:
            await tg.start(late.run)
            await until(lambda: late.lease is not None)
            lease = late.lease
            assert lease is not None and lease.usable_until is not None
            life = timedelta(seconds=late.lease_ttl_s) - late.lease_margin
            assert lease.usable_until <= router_clock() + life  # (the keeper's: 2 minutes more)
            # The keeper takes it back (as when it expires it by its clock): asked to extend
            # it, the keeper answers that it holds no such lease, and the router drops it.
            await give_back(dep.nc, lease.lease_id, kept="0", holder=late.holder)
            await late._renew_lease(Decimal(0))
            assert late.lease is not lease
            late.stop()


@contextlib.asynccontextmanager
async def _leased(
    tmp_path: Path,
    models: dict[str, str] | None = None,
    budget: str = "[budget]\ndaily_limit_cents = 1000\nlease_cents = 100\n",
) -> AsyncIterator[tuple[Any, RouterActor]]:
    """The keeper and a router holding a lease (claude answering 100 words by default; no
    per-task limit unless ``budget`` sets one)."""
    models = models or {"claude": "claude-opus-4-5-len-100"}
    async with deployment(
        tmp_path, lambda url: config_text(url, models=models, budget=budget), keeper=True
    ) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        yield dep, router


async def test_concurrent_requests_of_one_task_keep_to_its_cap_with_a_lease_held(
    tmp_path: Path,
) -> None:
    """A task's spend cap is checked against the task's spend and its other attempts' money,
    which the router counts as pending (bounds in flight, costs not yet in the log): twenty
    concurrent requests of one task, with the router holding a lease, spend no more than the
    cap (they spent six times it, checked against the task's recorded spend alone)."""
    models = {"claude": "claude-opus-4-5-len-100-slow-300", "openai": "gpt-4-len-100-slow-300"}
    budget = "[budget]\ndaily_limit_cents = 1000\nper_task_limit_cents = 0.5\nlease_cents = 100\n"
    async with _leased(tmp_path, models, budget) as (dep, router):
        answered: list[object] = []

        async def one(i: int) -> None:
            with contextlib.suppress(VaporaError):  # refused: within the cap, as wanted
                answered.append(
                    await dep.client.complete(
                        prompt=f"hello {i}",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=100,
                        task_id="T1",
                    )
                )

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        # Every attempt answered: once the log's spend reaches the router, nothing is pending.
        await until(lambda: "T1" not in router.task_pending)
        events = await dep.events()
    spent = sum(
        (e.cost_usd for e in events if isinstance(e, SpendRecorded) and e.task_id == "T1"),
        Decimal(0),
    )
    assert answered and Decimal(0) < spent <= Decimal("0.005")


async def test_a_later_request_naming_no_cap_keeps_to_the_cap_its_task_asked_for(
    tmp_path: Path,
) -> None:
    """A task keeps the lowest cap any of its requests asked for (docs/configuration.md): the
    keeper holds a reservation to it, but a later request of the task naming no cap was admitted
    on the router's lease, unchecked ($0.58 against a remembered $0.15 in a review, with no
    per-task limit in the config). The router takes the cap from the task's reservations, the
    same after it starts again."""
    async with _leased(tmp_path) as (dep, router):
        ask_ = {"prompt": "hello", "provider": "claude", "max_tokens": 100, "task_id": "C1"}
        # A cap of one call and a half: the first is admitted, a second would pass it.
        one = (await dep.client.complete(**{**ask_, "task_id": "other"})).cost_usd
        first = await dep.client.complete(**ask_, budget_cents=one * 150)
        assert first.cost_usd == one
        refused = []
        for restarted in (False, True):
            if restarted:  # a router that starts reads the cap from the log
                router.stop()
                again = RouterActor(dep.runtime, reserve=True)
                async with anyio.create_task_group() as tg:
                    await tg.start(again.run)
                    with pytest.raises(BudgetExceeded) as out:
                        await dep.client.complete(**ask_)
                    refused.append(out.value)
                    again.stop()
            else:
                with pytest.raises(BudgetExceeded) as out:
                    await dep.client.complete(**ask_)
                refused.append(out.value)
        events = await dep.events()
    spent = [e.cost_usd for e in events if isinstance(e, SpendRecorded) and e.task_id == "C1"]
    assert spent == [first.cost_usd]
    assert all("remaining" in str(e) or "cap" in str(e) for e in refused), refused


async def test_a_router_that_starts_takes_the_caps_the_keeper_enforces_before_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router's start reads the last hour of the log: a task whose capped request came
    before that had its next request naming no cap admitted on the new router's lease, past
    the cap the keeper held the task to. The router now reads the keeper's caps
    (``vapora.budget.caps``) before it asks for a lease. The hour is made nothing here."""
    monkeypatch.setattr("actors.router.TASK_SPEND_WINDOW", timedelta(0))
    async with _leased(tmp_path) as (dep, router):
        ask_ = {"prompt": "hello", "provider": "claude", "max_tokens": 100, "task_id": "C4"}
        one = (await dep.client.complete(**{**ask_, "task_id": "other"})).cost_usd
        first = await dep.client.complete(**ask_, budget_cents=one * 150)
        router.stop()
        again = RouterActor(dep.runtime, reserve=True)
        async with anyio.create_task_group() as tg:
            await tg.start(again.run)
            await until(lambda: again.lease is not None)  # admitted on it, but for the cap
            with pytest.raises(BudgetExceeded, match="limit"):  # (the keeper's refusal)
                await dep.client.complete(**ask_)
            assert again.task_caps["C4"][0] == one * Decimal("1.5")
            again.stop()
        events = await dep.events()
    spent = [e.cost_usd for e in events if isinstance(e, SpendRecorded) and e.task_id == "C4"]
    assert spent == [first.cost_usd]


async def test_pages_of_caps_that_end_at_a_shards_first_cap_miss_none(
    conn: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of one cap each, so that pages end at every place, a shard's first cap included:
    the next page resumed in the new shard after the last cap taken, which was the previous
    shard's, and skipped the new shard's caps ordered before it (a read-through)."""
    from actors import budget_keeper as keeper_module
    from actors.service import reply_room

    keeper = BudgetKeeper(runtime(conn, tmp_path, cfg=config(daily_cents=1000)))
    async with running(keeper):
        wanted = {f"task-{n:03d}": Decimal(n + 1) / 100 for n in range(60)}
        for task_id, cap in wanted.items():
            held = BudgetReserve(
                reservation_id=uuid.uuid4().hex,
                task_id=task_id,
                provider="claude",
                amount_usd=Decimal("0.001"),
                task_limit_usd=cap,
            )
            await ask(conn, subjects.BUDGET_RESERVE, held)
        # Room for one cap a page (a cap is about 80 bytes here).
        monkeypatch.setattr(keeper_module, "_CAPS_MARGIN", reply_room(conn) - 120)
        got: dict[str, Decimal] = {}
        cursor, pages = "", 0
        while True:
            page = (await ask(conn, subjects.BUDGET_CAPS, BudgetCapsRequest(cursor=cursor))).as_(
                BudgetCaps
            )
            pages += 1
            got.update((c.task_id, c.cap_usd) for c in page.caps)
            if not page.cursor:
                break
            cursor = page.cursor
        assert got == wanted and pages >= 60


async def test_the_keepers_task_caps_come_a_message_at_a_time_and_a_router_reads_them_all(
    tmp_path: Path,
) -> None:
    """12,000 capped tasks on a server with nats-server's default 1 MB ``max_payload``: the
    keeper gives as many as fit in a reply (a first version gave 10,000 at a time, 1.08 MB:
    every read failed and no router took a lease again), and a router reads every page."""
    async with EmbeddedNats(tmp_path / "nats", extra_config="max_payload: 1048576\n") as server:
        nc = await connect(ConnectOptions.from_url(server.url, name="caps"))
        try:
            rt = runtime(nc, tmp_path, cfg=config(daily_cents=1000))
            await rt.log.ensure_stream()
            wanted = {f"{uuid.UUID(int=n)}": Decimal(n % 97 + 1) / 100 for n in range(12_000)}
            held = [
                BudgetReserved(
                    id=uuid.uuid4().hex,
                    at=NOON,
                    task_id=task_id,
                    reservation_id=uuid.uuid4().hex,
                    provider="claude",
                    amount_usd=Decimal("0.000001"),
                    expires_at=NOON + timedelta(hours=1),
                    task_limit_usd=cap,
                )
                for task_id, cap in [*wanted.items(), ("uncapped", None)]
            ]
            for start in range(0, len(held), 2000):
                await rt.log.append_many(held[start : start + 2000])
            keeper = BudgetKeeper(rt)
            async with running(keeper):
                got: dict[str, Decimal] = {}
                pages, cursor = 0, ""
                while True:
                    message = await nc.request(
                        subjects.BUDGET_CAPS, encode(BudgetCapsRequest(cursor=cursor)), timeout=10
                    )
                    assert len(message.data) <= 1_048_576 - 16 * 1024
                    page = decode(message.data, BudgetCaps)
                    pages += 1
                    assert not got.keys() & {c.task_id for c in page.caps}  # none twice
                    got.update((c.task_id, c.cap_usd) for c in page.caps)
                    if not page.cursor:
                        break
                    cursor = page.cursor
                assert got == wanted and pages > 1
                refused = await ask(nc, subjects.BUDGET_CAPS, BudgetCapsRequest(cursor="x"))
                assert refused.status == "400" and "cursor" in refused.error().error.message
                other_run = "0" * 12 + cursor[12:] if cursor else "000000000000:0:a"
                restarted = await ask(nc, subjects.BUDGET_CAPS, BudgetCapsRequest(cursor=other_run))
                assert restarted.status == "409"
                router = RouterActor(rt, reserve=True, lease=True)
                async with running(router):
                    await until(lambda: router._caps_read)
                    assert {t: cap for t, (cap, _) in router.task_caps.items()} == wanted
        finally:
            await nc.close()


async def test_a_cap_the_keeper_never_held_is_not_kept_and_a_kept_one_is_forgotten_in_time(
    tmp_path: Path,
) -> None:
    """The router keeps a task's cap as the keeper does: from a reservation admitted under it
    (a cap refused before any reservation, a mistyped `budget_cents`, is held by no one: kept
    by the router alone, it refused the task's later requests for good, a review), and not
    past ``task_retention_hours`` without a word of the task (the keeper forgets it then)."""
    async with _leased(tmp_path) as (dep, router):
        ask_ = {"prompt": "hello", "provider": "claude", "max_tokens": 100, "task_id": "C2"}
        with pytest.raises(BudgetExceeded):
            await dep.client.complete(**ask_, budget_cents=Decimal("0.00001"))
        assert "C2" not in router.task_caps
        assert (await dep.client.complete(**ask_, budget_cents=50)).cost_usd > 0
        assert router.task_caps["C2"][0] == Decimal("0.5")
        cap, heard = router.task_caps["C2"]
        retention = dep.runtime.config.budget.task_retention
        # The keeper forgets it on the first event of a UTC day past the retention: up to a
        # day later. Kept by the router until then (first forgotten here, it went unchecked).
        router.task_caps["C2"] = (cap, heard - retention - timedelta(hours=23))
        assert router._cap_of("C2") == cap
        router.task_caps["C2"] = (cap, heard - retention - timedelta(days=1, seconds=1))
        assert router._cap_of("C2") is None and "C2" not in router.task_caps
        # An event's time without a zone (the contract does not ask one) is taken as UTC.
        router._lower_cap("C3", Decimal(1), datetime(2026, 11, 27, 10, 0))
        router._lower_cap("C3", None, datetime(2026, 11, 27, 11, 0, tzinfo=UTC))
        assert router.task_caps["C3"] == (Decimal(1), datetime(2026, 11, 27, 11, 0, tzinfo=UTC))


async def test_with_no_keeper_a_router_keeps_the_cap_it_checks_alone(tmp_path: Path) -> None:
    """No daily or monthly limit and no keeper: a router checks a named task's cap alone, and
    keeps it for the task's later requests naming none (forgotten when caps were taken from
    the keeper's reservations alone, a review: 2.7 times the cap spent)."""
    models = {"claude": "claude-opus-4-5-len-100"}
    async with deployment(tmp_path, lambda url: config_text(url, models=models)) as dep:
        ask_ = {"prompt": "hello", "provider": "claude", "max_tokens": 100, "task_id": "K1"}
        one = (await dep.client.complete(**{**ask_, "task_id": "other"})).cost_usd
        await dep.client.complete(**ask_, budget_cents=one * 150)
        with pytest.raises(BudgetExceeded):
            await dep.client.complete(**ask_)
        events = await dep.events()
    spent = [e.cost_usd for e in events if isinstance(e, SpendRecorded) and e.task_id == "K1"]
    assert spent == [one]


async def test_a_retry_after_a_silent_provider_actor_holds_budget_of_its_own(
    tmp_path: Path,
) -> None:
    """A provider actor that answers too late for the router (busy, slow to append) may still
    bill its call, against the reservation it was given. The router retries such a silent
    attempt: with a reservation of its own, and without releasing the first one, so that each
    call that bills was held for (the retry reused the first reservation, which the first
    call's spend had already closed, and a failed retry released it while both could bill)."""
    budget = "[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n"
    async with _impatient(tmp_path, budget) as dep:
        provider = dep.providers["openai"]
        _late_first_call(provider)
        await dep.client.complete(prompt="hello", provider="openai", task_id="T-silent")
        spends = await _both_spends(dep, "T-silent")
        events = await _events_of(dep, "T-silent")
    assert len({s.reservation_id for s in spends}) == 2  # each against a hold of its own
    # The silent attempt is in the log, as a fallback to the same provider (nothing recorded
    # it when the actor's answer never came).
    silent = [e for e in events if isinstance(e, FallbackTriggered)]
    assert [(e.from_provider, e.to_provider) for e in silent] == [("openai", "openai")]
    assert silent[0].reason.startswith("no_reply")


def _impatient(tmp_path: Path, budget: str) -> Any:
    """A deployment (with the keeper) whose router waits 0.7 s for an openai answer: its 0.5 s
    time limit and 0.2 s of grace."""
    return deployment(
        tmp_path,
        lambda url: config_text(url, timeouts={"openai": 500}, budget=budget),
        keeper=True,
        router_options={"grace_s": 0.2},
    )


def _late_first_call(provider: Any) -> None:
    """The provider actor's first call waits past the router's wait (0.5 s + 0.2 s in these
    tests), then is made and billed."""
    complete = provider.client.complete
    slow = [True]

    async def late_once(*args: Any, **kw: Any) -> Any:
        if slow.pop() if slow else False:
            await anyio.sleep(1.5)
        return await complete(*args, **kw)

    provider.client.complete = late_once


async def _both_spends(dep: Any, task_id: str) -> list[SpendRecorded]:
    """The task's two spends, once the late call has ended and appended its own too."""
    with anyio.fail_after(20):
        while True:
            spends = [e for e in await _events_of(dep, task_id) if isinstance(e, SpendRecorded)]
            if len(spends) >= 2:
                return spends
            await anyio.sleep(0.05)


async def _events_of(dep: Any, task_id: str) -> list[Any]:
    return [e for e in await dep.events() if getattr(e, "task_id", None) == task_id]


async def test_a_stream_whose_provider_actor_goes_silent_leaves_the_attempt_in_the_log(
    tmp_path: Path,
) -> None:
    # A provider actor killed mid-stream: the task's log held only its route_decided, the
    # attempt (of unknown cost: its hold stays) nowhere; the caller's error said it cost 0.
    async with deployment(
        tmp_path,
        lambda url: config_text(url, timeouts={"openai": 500}),
        router_options={"grace_s": 0.2},
    ) as dep:
        provider = dep.providers["openai"]

        async def silent(*args: Any, **kw: Any) -> Any:
            await anyio.sleep(30)  # an actor that says nothing more

        provider._send = silent  # type: ignore[method-assign]
        with pytest.raises(VaporaError) as failed:
            async with dep.client.stream(prompt="hello", provider="openai", task_id="T-s") as s:
                async for _ in s:
                    pass
        events = await _events_of(dep, "T-s")
    assert failed.value.code == "timeout"
    [ended] = [e for e in events if isinstance(e, FallbackTriggered)]
    assert (ended.from_provider, ended.to_provider) == ("openai", None)
    assert ended.reason.startswith("no_reply")


async def test_a_silent_attempt_is_sent_again_when_the_lease_cannot_hold_the_retry(
    tmp_path: Path,
) -> None:
    """A call in flight in a provider actor that died is sent again (docs/operations-cluster):
    a retry taken only from the router's lease was not sent when the lease was full (eight
    calls' bounds filled a $1 lease), and the request failed 503 with a healthy instance
    serving (6 of 8, a review). The retry is reserved with the keeper instead."""
    from vapora.pricing import upper_bound_cost
    from vapora.providers import ProviderRequest, input_token_bound, output_ceiling

    price = make_config(config_text("http://x")).provider("openai").price  # type: ignore[union-attr]
    asked = ProviderRequest(prompt="hello", max_tokens=200)
    bound = upper_bound_cost(input_token_bound(asked), output_ceiling("gpt-4", 200), price)
    cents = bound * 150  # the lease holds one attempt's bound, not two
    budget = f"[budget]\ndaily_limit_cents = 1000\nlease_cents = {cents}\n"
    async with _impatient(tmp_path, budget) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        provider = dep.providers["openai"]
        _late_first_call(provider)
        answer = await dep.client.complete(
            prompt="hello", provider="openai", max_tokens=200, task_id="T-full"
        )
        assert answer.text
        spends = await _both_spends(dep, "T-full")
        events = await _events_of(dep, "T-full")
    lease_id = router.lease.lease_id if router.lease is not None else None
    held = {s.reservation_id for s in spends}
    assert len(held) == 2 and lease_id in held  # the silent one on the lease, the retry reserved
    [reserved] = [e for e in events if isinstance(e, BudgetReserved)]
    assert reserved.amount_usd == bound and reserved.reservation_id in held


@pytest.mark.parametrize("lease_cents", [0, 100])
async def test_a_call_whose_spend_came_but_not_its_answer_is_not_sent_again(
    tmp_path: Path, lease_cents: int
) -> None:
    """The call was made and billed (its spend in the log), its answer lost on the way back
    (a nats-server killed and restarted a second later, in a review): sent again, the provider
    billed it twice, 12 of 36 calls. The router, hearing the attempt's spend, does not send it
    to that provider again (the chain goes on, as after a failure: here it holds no other)."""
    from vapora.errors import NoProviderAvailable

    budget = f"[budget]\ndaily_limit_cents = 1000\nlease_cents = {lease_cents}\n"
    async with _impatient(tmp_path, budget) as dep:
        provider = dep.providers["openai"]
        handle = provider.service._served["call"].endpoint.handler
        lost = [True]

        async def answer_lost_once(*args: Any, **kw: Any) -> Any:
            answer = await handle(*args, **kw)  # made, billed, its spend appended
            if lost.pop() if lost else False:
                await anyio.sleep(1.5)  # past the router's wait (0.5 s + 0.2 s)
            return answer

        served = provider.service._served["call"]
        served.endpoint = dataclasses.replace(served.endpoint, handler=answer_lost_once)
        if lease_cents:
            assert dep.router is not None
            await until(lambda: dep.router.lease is not None)  # type: ignore[union-attr]
        with pytest.raises(NoProviderAvailable, match="its answer was lost on the way back"):
            await dep.client.complete(prompt="hello", provider="openai", task_id="T-lost")
        await anyio.sleep(1.0)  # the late answer, and anything sent again, would be in by now
        events = await _events_of(dep, "T-lost")
    assert len([e for e in events if isinstance(e, SpendRecorded)]) == 1
    assert len([r for r in dep.sim.requests if r.provider == "openai"]) == 1


async def test_a_silent_attempts_retry_past_the_requests_cap_is_not_sent(tmp_path: Path) -> None:
    """A request's cap (`budget_cents`, no task id) holds the silent attempt's bound as
    pending: its retry, taken from the router's lease, was never checked against the cap (two
    bounds sent under a cap of one and a half; a review's suspicion, shown here)."""
    from vapora.pricing import upper_bound_cost
    from vapora.providers import ProviderRequest, input_token_bound, output_ceiling

    price = make_config(config_text("http://x")).provider("openai").price  # type: ignore[union-attr]
    asked = ProviderRequest(prompt="hello", max_tokens=200)
    bound = upper_bound_cost(input_token_bound(asked), output_ceiling("gpt-4", 200), price)
    async with _impatient(
        tmp_path, "[budget]\ndaily_limit_cents = 1000\nlease_cents = 100\n"
    ) as dep:
        assert dep.router is not None
        await until(lambda: dep.router.lease is not None)  # type: ignore[union-attr]
        _late_first_call(dep.providers["openai"])
        with pytest.raises(VaporaError):
            await dep.client.complete(
                prompt="hello", provider="openai", max_tokens=200, budget_cents=bound * 150
            )
        await anyio.sleep(1.5)  # the late call is made meanwhile; a retry would be too
    assert len([r for r in dep.sim.requests if r.provider == "openai"]) == 1
