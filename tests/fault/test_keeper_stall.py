"""A budget keeper that stalls past the router's timeout (its process SIGSTOPped) and then comes
back, or that is gone (SIGKILLed) when the router gives a hold back and is restarted: the
reservation and the lease the router gave up on or no longer needs are given back, not left
holding budget that nobody will use until they expire."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from actors.router import RouterActor
from events.log import BudgetLeased, BudgetLeaseReturned, BudgetReleased, BudgetReserved
from tests.fault.money import eventually, status
from tests.fault.money_process import MoneyProcess
from tests.fault.provider_harness import Deployment, config_text, deployment, wait_until_served
from vapora.errors import NoProviderAvailable, ProviderRejected

pytestmark = pytest.mark.anyio

KEEPER_TIMEOUT_S = 0.3


@contextlib.asynccontextmanager
async def keeper_process(
    tmp_path: Path, config: Callable[[str], str] = config_text
) -> AsyncIterator[tuple[Deployment, MoneyProcess]]:
    """The claude provider actor and a real keeper in its own process, serving; no router."""
    async with deployment(tmp_path, config, router=False, providers=["claude"]) as dep:
        data_dir = tmp_path / "money"
        data_dir.mkdir()
        money = MoneyProcess(dep.server.url, data_dir, daily_cents=10_000)
        await money.start()
        try:
            await status(dep.nc)
            yield dep, money
        finally:
            money.resume()
            await money.stop()


@contextlib.asynccontextmanager
async def stalled_keeper(tmp_path: Path) -> AsyncIterator[tuple[Deployment, MoneyProcess]]:
    """:func:`keeper_process`, its keeper stopped (SIGSTOP)."""
    async with keeper_process(tmp_path) as (dep, money):
        money.pause()
        yield dep, money


@contextlib.asynccontextmanager
async def router(
    dep: Deployment, *, lease: bool, keeper_timeout_s: float = KEEPER_TIMEOUT_S
) -> AsyncIterator[RouterActor]:
    actor = RouterActor(dep.runtime, reserve=True, lease=lease, keeper_timeout_s=keeper_timeout_s)
    # As if it had read the keeper's task caps (vapora.budget.caps) before the keeper stalled:
    # its first lease request goes to the stalled keeper (otherwise it would ask for none).
    actor._caps_read = True
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            await wait_until_served(dep.client.nc, "vapora.complete")
            yield actor
        finally:
            actor.stop()


async def test_a_reservation_the_router_gave_up_on_is_released_when_the_keeper_comes_back(
    tmp_path: Path,
) -> None:
    async with stalled_keeper(tmp_path) as (dep, money), router(dep, lease=False):
        with pytest.raises(NoProviderAvailable, match="budget keeper did not answer in time"):
            await dep.client.complete(prompt="hello", provider="claude", task_id="stalled")
        money.resume()

        async def settled() -> tuple[BudgetReserved, BudgetReleased] | None:
            events = await dep.events_of("stalled")
            reserved = [e for e in events if isinstance(e, BudgetReserved)]
            released = [e for e in events if isinstance(e, BudgetReleased)]
            return (reserved[0], released[0]) if reserved and released else None

        reserved, released = await eventually(settled, within=10)
        assert released.reservation_id == reserved.reservation_id
        assert released.reason == "not_called"
        after = await status(dep.nc)
        assert (after.open_reservations, after.reserved_usd) == (0, 0)


async def test_a_lease_the_router_gave_up_on_is_returned_when_the_keeper_comes_back(
    tmp_path: Path,
) -> None:
    async with stalled_keeper(tmp_path) as (dep, money), router(dep, lease=True) as actor:
        await anyio.sleep(KEEPER_TIMEOUT_S * 2)  # its first lease request went unanswered
        money.resume()

        async def returned() -> tuple[BudgetLeased, BudgetLeaseReturned] | None:
            events = [e for e in await dep.events() if getattr(e, "holder", "") == actor.holder]
            leased = [e for e in events if isinstance(e, BudgetLeased)]
            if not leased:
                return None
            back = [
                e
                for e in events
                if isinstance(e, BudgetLeaseReturned) and e.lease_id == leased[0].lease_id
            ]
            return (leased[0], back[0]) if back else None

        leased, back = await eventually(returned, within=10)
        assert back.kept_usd == 0 and back.reason == "returned"
        # The lease the router holds now, if any, is one it asked for again and got an answer.
        assert actor.lease is None or actor.lease.lease_id != leased.lease_id


async def test_a_release_sent_while_no_keeper_runs_reaches_the_keeper_that_comes_next(
    tmp_path: Path,
) -> None:
    # The provider answers 400 after 1.5 s: nothing to bill, so the router releases the hold.
    # The keeper is killed while the call runs, so the release finds no keeper; before, it was
    # lost and the hold stayed until it expired (120 s), its budget unusable meanwhile.
    models = {"claude": "claude-opus-4-5-slow-1500-error-400"}
    config = lambda url: config_text(url, models=models)  # noqa: E731
    async with (
        keeper_process(tmp_path, config) as (dep, money),
        # A keeper that answers (this test is not about a slow one).
        router(dep, lease=False, keeper_timeout_s=5),
    ):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(ProviderRejected):
                    await dep.client.complete(prompt="hi", provider="claude", task_id="gone")

            tg.start_soon(call)

            async def reserved() -> list[BudgetReserved]:
                events = await dep.events_of("gone")
                return [e for e in events if isinstance(e, BudgetReserved)]

            [held] = await eventually(reserved, within=10)

            async def calling() -> bool:
                return any(r.provider == "anthropic" for r in dep.sim.requests)

            # Killed once the call runs (its provider takes 1.5 s), not as soon as the
            # reservation is in the log: the keeper answers only after the log acknowledged its
            # append, and killed in between, it answered nobody (the router waited out its 5 s
            # and failed the call as the keeper's, not the provider's: 1 run in 10 or so).
            await eventually(calling, within=10)
            money.kill()
        # The call failed and its release went out while no keeper listened.
        events = await dep.events_of("gone")
        assert not [e for e in events if isinstance(e, BudgetReleased)]
        again = MoneyProcess(dep.server.url, money.data_dir, daily_cents=10_000)
        await again.start()
        try:

            async def released() -> list[BudgetReleased]:
                events = await dep.events_of("gone")
                return [e for e in events if isinstance(e, BudgetReleased)]

            [back] = await eventually(released, within=20)
            assert (back.reservation_id, back.reason) == (held.reservation_id, "failed")
            after = await status(dep.nc)
            assert (after.open_reservations, after.reserved_usd) == (0, 0)
        finally:
            await again.stop()
