"""An OpenAI project whose default service tier is ``priority`` (a request that names no tier is
served at the project's default): its calls were recorded at the standard rates, half what
OpenAI bills, and its reservations bounded at them (the first call's still, until 2026-11-28).
A provider whose config names a tier sends it, and is bounded at its rates. Real nats-server,
the budget keeper, the simulator over HTTP serving the project's default tier, ``priority``, or
the tier a request asks for."""

from __future__ import annotations

import functools
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from actors.router import RouterActor
from events.log import BudgetReserved, SpendRecorded
from tests.fault.provider_harness import Deployment, config_text, deployment
from vapora.errors import VaporaError
from vapora.pricing import cost, upper_bound_cost
from vapora.providers import input_token_bound, output_ceiling
from vapora.providers.values import ProviderRequest
from vapora.simulator.behaviour import Behaviour

pytestmark = pytest.mark.anyio


def _config(url: str, tier: str | None = None) -> str:
    # gpt-5 priced from the genai-prices table (no price in the file), which has its tiers.
    text = config_text(
        url,
        models={"openai": "gpt-5"},
        budget="[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n",
    )
    asked = f'service_tier = "{tier}"\n' if tier is not None else ""
    return text.replace("cost_per_1k_tokens = 0.030\n", asked)


async def _spend_of(dep: Deployment, task_id: str) -> SpendRecorded:
    with anyio.fail_after(10):
        while True:
            spends = [e for e in await dep.events_of(task_id) if isinstance(e, SpendRecorded)]
            if spends:
                return spends[0]
            await anyio.sleep(0.02)


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
    # Every attempt, the first too (before any spend said a tier), is bounded at the dearest
    # tier gpt-5 has rates for (priority, twice the standard rates): its bill never passes
    # its hold. (The first was bounded at the standard rates before, half its bill.)
    for spend, hold in ((spends[0], first), (spends[1], second)):
        assert spend.cost_usd <= hold.amount_usd
    assert second.amount_usd == first.amount_usd
    [restarted] = [e for e in events["t-3"] if isinstance(e, BudgetReserved)]
    assert restarted.amount_usd == second.amount_usd
    assert first.amount_usd == _standard_bound(dep, first) * 2 > Decimal(0)


def _standard_bound(dep: Deployment, hold: BudgetReserved) -> Decimal:
    """The hold the router makes for the test's call at gpt-5's standard rates."""
    request = ProviderRequest(prompt="one two three", max_tokens=500)
    price = dep.runtime.config.provider("openai").price  # type: ignore[union-attr]
    return upper_bound_cost(
        input_token_bound(request), output_ceiling("gpt-5", request.output_limit), price
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_that_names_its_tier_sends_it_and_is_bounded_at_its_rates(
    tmp_path: Path, stream: bool
) -> None:
    """``service_tier = "default"`` on a project whose default is priority: every call is
    served, billed and bounded at the standard rates (the bound is the bill's, not twice it);
    ``"priority"`` on a project whose default is the standard tier: served and billed at
    priority, bounded at its rates from the first call."""
    bounds: dict[str, Decimal] = {}
    for tier in ("default", "priority"):
        config = functools.partial(_config, tier=tier)
        async with deployment(tmp_path / tier, config, keeper=True) as dep:
            # The project's default is the other tier: only the request's makes it this one.
            other = "default" if tier == "priority" else "priority"
            dep.sim.app.controls["openai"].defaults = Behaviour(service_tier=other)
            asked = {"prompt": "one two three", "provider": "openai", "max_tokens": 500}
            if stream:
                async with dep.client.stream(**asked, task_id="t-1") as chunks:
                    async for _ in chunks:
                        pass
            else:
                await dep.client.complete(**asked, task_id="t-1")
            spend = await _spend_of(dep, "t-1")
            [hold] = [e for e in await dep.events_of("t-1") if isinstance(e, BudgetReserved)]
            bounds[tier] = hold.amount_usd
            standard = dep.runtime.config.provider("openai").price  # type: ignore[union-attr]
            if tier == "default":
                assert spend.price.source == "genai-prices"  # served at the tier it asked for
                assert spend.cost_usd == cost(spend, standard)  # type: ignore[arg-type]
                assert hold.amount_usd == _standard_bound(dep, hold)
            else:
                assert spend.price.source == "genai-prices service_tier=priority"
                assert spend.cost_usd == cost(spend, standard) * 2  # type: ignore[arg-type]
            assert Decimal(0) < spend.cost_usd <= hold.amount_usd
    assert bounds["priority"] == bounds["default"] * 2


async def test_a_call_whose_cost_is_not_known_is_recorded_at_the_dearest_tier(
    tmp_path: Path,
) -> None:
    """A call that timed out after it was sent (billed, its usage never read), before any spend
    said a tier: the provider actor recorded it at the standard rates, the keeper settled the
    router's hold (at the dearest tier) at that and freed the rest, and a priority project was
    billed twice what was recorded (a review). It is recorded at the hold's rates."""

    def config(url: str) -> str:
        text = config_text(
            url,
            models={"openai": "gpt-5"},
            timeouts={"openai": 500},
            budget="[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n",
        )
        return text.replace("cost_per_1k_tokens = 0.030\n", "")

    async with deployment(tmp_path, config, keeper=True) as dep:
        dep.sim.app.controls["openai"].defaults = Behaviour(service_tier="priority", hang=True)
        with pytest.raises(VaporaError):
            await dep.client.complete(
                prompt="one two three", provider="openai", max_tokens=500, task_id="t-1"
            )
        spend = await _spend_of(dep, "t-1")
        [hold] = [e for e in await dep.events_of("t-1") if isinstance(e, BudgetReserved)]
    assert spend.usage_estimated
    assert spend.cost_usd == hold.amount_usd == _standard_bound(dep, hold) * 2
