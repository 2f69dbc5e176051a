"""The event log refuses appends (a full stream that discards new messages) while a paid call
runs, for longer than the call's hold lives: the provider actor answers, keeps the call's
`spend_recorded` on disk and appends it again every 2 s. When the log took appends again, the
keeper released the hold as expired at once, admitted new paid work into that room, and then
the held spend landed: the day's spend passed its limit. The provider actor now tells the keeper
which holds' spend it holds (`vapora.budget.pending`), and the keeper expires none of them."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from nats.js.api import DiscardPolicy

from actors.budget_keeper import BudgetKeeper
from actors.router import RouterActor
from events.log import BudgetReleased, BudgetReserved, Event, SpendRecorded
from tests.fault.money import FakeClock, running
from tests.fault.provider_harness import config_text, deployment, until, wait_until_served
from vapora.errors import BudgetExceeded

pytestmark = pytest.mark.anyio

LIMIT = Decimal("0.08")


async def test_a_hold_does_not_expire_before_the_spend_held_through_a_log_outage(
    tmp_path: Path,
) -> None:
    models = {"claude": "claude-opus-4-5-len-3000-slow-1500"}
    budget = "[budget]\ndaily_limit_cents = 8\nlease_cents = 0\n"

    def config(url: str) -> str:
        return config_text(url, models=models, budget=budget)

    async with deployment(tmp_path, config, router=False) as dep:
        dep.log.ack_timeout = 1.0  # as test_held_crash.py shortens it
        clock = FakeClock(datetime.now(UTC))
        keeper = BudgetKeeper(dataclasses.replace(dep.runtime, clock=clock), tick_s=0.2)

        async def events() -> list[Event]:
            return [e.event async for b in dep.log.replay() for e in b]

        for provider in dep.providers.values():
            provider.held_retry_s = 0.1  # retried (and said) often, as the clock runs fast
        async with running(keeper):
            router = RouterActor(dep.runtime, reserve=True)
            async with anyio.create_task_group() as tg:
                await tg.start(router.run)
                await wait_until_served(dep.client.nc, "vapora.complete")
                first: list[object] = []

                async def call() -> None:
                    first.append(
                        await dep.client.complete(
                            prompt="write a function",
                            task_type="CodeGeneration",
                            quality="High",
                            max_tokens=4000,
                            task_id="T1",
                        )
                    )

                tg.start_soon(call)
                with anyio.fail_after(10):
                    while not [e for e in await events() if isinstance(e, BudgetReserved)]:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                js = dep.log.js
                info = await js.stream_info(dep.log.settings.name)
                full = dataclasses.replace(
                    info.config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW
                )
                await js.update_stream(full)  # the log refuses every append from here
                await until(lambda: bool(first), within_s=20)
                for _ in range(10):  # the outage outlasts the hold (120 s): 200 s pass
                    clock.advance(20)
                    await anyio.sleep(0.3)  # the provider actor retries, and says so
                await js.update_stream(info.config)
                with anyio.fail_after(20):  # the held spend lands
                    while not [e for e in await events() if isinstance(e, SpendRecorded)]:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                clock.advance(60)  # past the grace: the hold is settled, nothing to expire
                await anyio.sleep(0.5)
                with contextlib.suppress(BudgetExceeded):  # refused: the first spend counts
                    await dep.client.complete(
                        prompt="write a function",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=4000,
                        task_id="T2",
                    )
                router.stop()
            logged = await events()
    spends = [e for e in logged if isinstance(e, SpendRecorded)]
    assert sum((e.cost_usd for e in spends), Decimal(0)) <= LIMIT
    expired = [e for e in logged if isinstance(e, BudgetReleased) and e.reason == "expired"]
    first_hold = next(e for e in logged if isinstance(e, BudgetReserved) and e.task_id == "T1")
    assert first_hold.reservation_id not in {e.reservation_id for e in expired}
