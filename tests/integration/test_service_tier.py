"""An OpenAI project whose default service tier is ``priority`` (a request that names no tier is
served at the project's default): its calls were recorded at the standard rates, half what
OpenAI bills, and its reservations bounded at them. Real nats-server, the budget keeper, the
simulator over HTTP answering ``service_tier: priority``."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from actors.router import RouterActor
from events.log import BudgetReserved, SpendRecorded
from tests.fault.provider_harness import config_text, deployment
from vapora.pricing import cost
from vapora.simulator.behaviour import Behaviour

pytestmark = pytest.mark.anyio


def _config(url: str) -> str:
    # gpt-5 priced from the genai-prices table (no price in the file), which has its tiers.
    text = config_text(
        url,
        models={"openai": "gpt-5"},
        budget="[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n",
    )
    return text.replace("cost_per_1k_tokens = 0.030\n", "")


async def test_a_priority_tier_call_is_billed_and_then_bounded_at_its_rates(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, _config, keeper=True) as dep:
        dep.sim.app.controls["openai"].defaults = Behaviour(service_tier="priority")
        for task_id in ("t-1", "t-2"):
            await dep.client.complete(
                prompt="one two three", provider="openai", max_tokens=500, task_id=task_id
            )
            with anyio.fail_after(10):
                while not [e for e in await dep.events_of(task_id) if isinstance(e, SpendRecorded)]:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        # A router that starts (again) learns the tier from the spend it reads at its start:
        # its first attempt is bounded at the priority rates (at the standard ones before).
        assert dep.router is not None
        dep.router.stop()
        async with anyio.create_task_group() as tg:
            again = RouterActor(dep.runtime, reserve=True)
            await tg.start(again.run)
            await dep.client.complete(
                prompt="one two three", provider="openai", max_tokens=500, task_id="t-3"
            )
            again.stop()
        with anyio.fail_after(10):
            while not [e for e in await dep.events_of("t-3") if isinstance(e, SpendRecorded)]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        events = {t: await dep.events_of(t) for t in ("t-1", "t-2", "t-3")}
    spends = [e for t in events.values() for e in t if isinstance(e, SpendRecorded)]
    assert len(spends) == 3
    assert all(s.price.source == "genai-prices service_tier=priority" for s in spends)
    standard = dep.runtime.config.provider("openai").price  # type: ignore[union-attr]
    for spend in spends:  # at the priority rates: twice gpt-5's standard ones
        assert spend.cost_usd == cost(spend, standard) * 2 > 0  # type: ignore[arg-type]
    first, second = (
        next(e for e in events[t] if isinstance(e, BudgetReserved)) for t in ("t-1", "t-2")
    )
    # The first was bounded at the standard rates (the tier was not known yet); once a spend
    # said priority, the next attempt's bound is at its rates.
    assert second.amount_usd == first.amount_usd * 2
    [restarted] = [e for e in events["t-3"] if isinstance(e, BudgetReserved)]
    assert restarted.amount_usd == second.amount_usd
    assert first.amount_usd > Decimal(0)
