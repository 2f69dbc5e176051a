"""Which attempts the router holds budget for: a paid provider's, never a zero-cost one's
(DESIGN §4, reservation)."""

from __future__ import annotations

import contextlib
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from events.codec import decode
from events.contract import CompletionResult, Outcome, StreamEnd
from events.log import BudgetReserved, CallFailed, SpendRecorded
from tests.fault.provider_harness import config_text, deployment
from vapora.errors import BudgetExceeded, NoProviderAvailable, VaporaError

pytestmark = pytest.mark.anyio

BUDGET = "[budget]\ndaily_limit_cents = 100000\nlease_cents = 0\n"  # reserve per attempt


async def test_paid_attempts_reserve_and_zero_cost_ones_do_not(tmp_path: Path) -> None:
    def config(base_url: str) -> str:
        return config_text(base_url, budget=BUDGET)

    async with deployment(tmp_path, config, keeper=True) as dep:
        paid = await dep.client.complete(prompt="hello", provider="openai")
        free = await dep.client.complete(prompt="hello", provider="ollama")
        reserved = {e.task_id: e for e in await dep.events() if isinstance(e, BudgetReserved)}
        assert reserved[paid.task_id].provider == "openai"
        assert free.task_id not in reserved
        [spend] = [e for e in await dep.events_of(paid.task_id) if isinstance(e, SpendRecorded)]
        assert spend.reservation_id == reserved[paid.task_id].reservation_id


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # The keeper refuses ids past 200 characters: taken, the task failed as over budget.
        (b'{"prompt": "hi", "task_id": "' + b"t" * 201 + b'"}', "`task_id` must be 1 to 200"),
        # Just under the provider actor's limit: the provider call it became went over it, and
        # every attempt failed after its budget was reserved.
        (b'{"prompt": "' + b"x" * (1_048_576 - 1_000) + b'"}', "the limit is"),
        (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    ],
)
async def test_requests_that_cannot_become_a_call_get_400_before_any_budget_is_held(
    tmp_path: Path, body: bytes, named: str
) -> None:
    def config(base_url: str) -> str:
        return config_text(base_url, budget=BUDGET)

    async with deployment(tmp_path, config, keeper=True) as dep:
        before = await dep.log.last_sequence()
        reply = await dep.nc.request("vapora.complete", body, timeout=10)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "400"
        assert named in reply.headers["Nats-Service-Error"]
        assert await dep.log.last_sequence() == before  # nothing decided, nothing reserved


async def test_a_reservation_is_held_past_its_attempts_whole_life(tmp_path: Path) -> None:
    """It was held the contract's default 120 s whatever the provider's timeout: a call of a
    provider with a 300 s timeout could still be running, and billing, when the keeper expired
    its hold and admitted other spend in its place."""

    def config(base_url: str) -> str:
        return config_text(base_url, budget=BUDGET, timeouts={"openai": 300_000})

    async with deployment(tmp_path, config, keeper=True) as dep:
        paid = await dep.client.complete(prompt="hello", provider="openai")
        [held] = [e for e in await dep.events_of(paid.task_id) if isinstance(e, BudgetReserved)]
        assert (held.expires_at - held.at).total_seconds() >= 300 + 30


async def test_a_keeper_that_cannot_answer_is_no_budget_refusal(tmp_path: Path) -> None:
    """No budget keeper running: nothing says the budget is spent, so the answer is 503
    ``no_provider_available`` (it was 402 ``budget_exceeded``)."""
    options = {"reserve": True, "lease": False}
    async with deployment(tmp_path, config_text, router_options=options) as dep:
        with pytest.raises(NoProviderAvailable, match="budget keeper is not running"):
            await dep.client.complete(prompt="hello", provider="openai")


async def test_a_task_whose_cap_skips_every_candidate_is_a_budget_refusal(tmp_path: Path) -> None:
    """The router's own per-task check (money of the task's attempts in flight) skipping the
    only candidate was answered 503, where the keeper's refusal of the same attempt is 402."""

    def config(base_url: str) -> str:  # one attempt's bound (~$0.12) fits the cap, two do not
        return config_text(
            base_url,
            models={"openai": "gpt-4-slow-500"},
            budget="[budget]\nper_task_limit_cents = 20\n",
        )

    async with deployment(tmp_path, config, keeper=True) as dep:
        outcomes: list[object] = []

        async def one() -> None:
            try:
                outcomes.append(
                    await dep.client.complete(prompt="hello", provider="openai", task_id="T-cap")
                )
            except Exception as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.2)  # the first is with the provider, its bound pending
            tg.start_soon(one)
        refused = [o for o in outcomes if isinstance(o, Exception)]
        assert len(refused) == 1, outcomes
        assert isinstance(refused[0], BudgetExceeded), refused[0]


async def test_a_restarted_router_still_counts_what_a_task_spent(tmp_path: Path) -> None:
    """The per-task cap counts all attempts of a task; a router that started again knew nothing
    of what the task had spent, and let it spend its whole cap again."""
    from actors.router import RouterActor
    from vapora.pricing import upper_bound_cost
    from vapora.providers import ProviderRequest, input_token_bound

    async with deployment(tmp_path, config_text, router=False) as dep:
        price = dep.runtime.config.provider("openai").price  # type: ignore[union-attr]
        bound = upper_bound_cost(
            input_token_bound(ProviderRequest(prompt="hello", max_tokens=16)), 16, price
        )
        cap_cents = bound * 100 + Decimal("0.0001")  # one attempt's bound fits, not two
        ask = {"prompt": "hello", "provider": "openai", "max_tokens": 16, "task_id": "T-again"}

        async def served_by_a_new_router(expect_refusal: bool) -> None:
            router = RouterActor(dep.runtime, reserve=False)
            async with anyio.create_task_group() as tg:
                await tg.start(router.run)
                if expect_refusal:
                    with pytest.raises(BudgetExceeded):
                        await dep.client.complete(budget_cents=cap_cents, **ask)
                else:
                    await dep.client.complete(budget_cents=cap_cents, **ask)
                router.stop()

        await served_by_a_new_router(expect_refusal=False)
        await served_by_a_new_router(expect_refusal=True)
        spent = [e for e in await dep.events_of("T-again") if isinstance(e, SpendRecorded)]
        assert len(spent) == 1


@pytest.mark.parametrize(
    "budget",
    [
        # Leasing routers: a lease's attempts were invisible to the keeper's task check.
        "[budget]\ndaily_limit_cents = 1000\nper_task_limit_cents = 0.5\nlease_cents = 100\n",
        # A per-task limit alone: the routers never asked the keeper at all.
        "[budget]\nper_task_limit_cents = 0.5\n",
    ],
)
async def test_a_tasks_cap_holds_across_two_routers(tmp_path: Path, budget: str) -> None:
    """Each router counts only its own attempts in flight: a task whose concurrent requests
    reached two routers spent $0.00918 against a $0.005 cap."""
    from actors.router import RouterActor
    from tests.fault.provider_harness import until

    models = {"claude": "claude-opus-4-5-len-100-slow-300", "openai": "gpt-4-len-100-slow-300"}

    def config(base_url: str) -> str:
        return config_text(base_url, models=models, budget=budget)

    async with deployment(tmp_path, config, keeper=True) as dep:
        first = dep.router
        assert first is not None
        second = RouterActor(dep.runtime)
        async with anyio.create_task_group() as routers:
            await routers.start(second.run)
            if "lease_cents" in budget:  # both hold a lease before the requests come
                await until(lambda: first.lease is not None and second.lease is not None)

            async def one(i: int) -> None:
                with contextlib.suppress(VaporaError):
                    await dep.client.complete(
                        prompt=f"hello {i}",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=100,
                        task_id="T-two-routers",
                    )

            async with anyio.create_task_group() as requests:
                for i in range(20):
                    requests.start_soon(one, i)
            second.stop()
        events = await dep.events()
    spends = [e for e in events if isinstance(e, SpendRecorded) and e.task_id == "T-two-routers"]
    assert {e.provider for e in spends} & {"claude", "openai"}  # paid calls were made
    assert sum((e.cost_usd for e in spends), Decimal(0)) <= Decimal("0.005")


async def test_a_provider_timeout_after_the_request_was_sent_keeps_its_hold(
    tmp_path: Path,
) -> None:
    """The provider had the request when its time ran out and may still bill it: the router
    released its hold as "failed, nothing to bill" and paid the fallback with it. Later its hold
    was kept but expired at $0, and nothing recorded the spend: it is recorded at the attempt's
    upper bound, which settles the hold."""
    from events.log import BudgetReleased

    def config(base_url: str) -> str:
        return config_text(
            base_url,
            models={"claude": "claude-opus-4-5-slow-2000"},
            timeouts={"claude": 300},
            budget=BUDGET,
        )

    async with deployment(tmp_path, config, keeper=True) as dep:
        done = await dep.client.complete(
            prompt="hello", task_type="CodeGeneration", quality="High", max_tokens=16
        )
        events = await dep.events_of(done.task_id)
    [timed_out] = [e for e in events if isinstance(e, CallFailed) and e.provider == "claude"]
    assert timed_out.error_class == "timeout"
    held = {e.reservation_id for e in events if isinstance(e, BudgetReserved)}
    claude_hold = [
        e.reservation_id for e in events if isinstance(e, BudgetReserved) and e.provider == "claude"
    ]
    assert claude_hold and held
    released = {e.reservation_id for e in events if isinstance(e, BudgetReleased)}
    assert claude_hold[0] not in released  # kept until its spend or its expiry
    assert done.provider != "claude"  # the chain went on to the next provider
    [spent] = [e for e in events if isinstance(e, SpendRecorded) and e.provider == "claude"]
    assert spent.cost_usd == timed_out.cost_usd > 0
    assert spent.output_tokens == 16  # the attempt's upper bound: its whole output limit


async def test_a_call_that_waited_past_its_time_in_the_backlog_is_not_made(
    tmp_path: Path,
) -> None:
    """Calls waiting in a busy provider actor's backlog started after the router had given up on
    them (and retried them): six requests, one answered, eleven calls billed. A call whose time
    ran out in the backlog is now refused without calling the provider."""
    budget = "[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n"

    def config(base_url: str) -> str:
        return config_text(
            base_url, models={"openai": "gpt-4-slow-700"}, timeouts={"openai": 1000}, budget=budget
        )

    async with deployment(
        tmp_path,
        config,
        keeper=True,
        providers=["openai"],
        router_options={"grace_s": 0.2},
        provider_options={"max_concurrency": 1},
    ) as dep:
        answered: list[object] = []

        async def one(i: int) -> None:
            with contextlib.suppress(VaporaError):
                answered.append(
                    await dep.client.complete(prompt=f"hi {i}", provider="openai", task_id=f"Q{i}")
                )

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        await anyio.sleep(3)  # whatever waited in the backlog has come out of it by now
        events = await dep.events()
    spends = [e.task_id for e in events if isinstance(e, SpendRecorded)]
    # A call timed out after it went out is billed (at its upper bound); one refused from the
    # backlog never reached the provider, and is not: at most the one call in progress when
    # the first answer came.
    timed_out = {
        e.task_id for e in events if isinstance(e, CallFailed) and e.error_code == "timeout"
    }
    assert answered and len(spends) == len(set(spends))
    assert set(spends) == {r.task_id for r in answered} | timed_out  # type: ignore[attr-defined]
    assert len(timed_out) <= 1


async def test_a_streams_time_to_first_token_counts_its_wait_in_the_backlog(
    tmp_path: Path,
) -> None:
    """A stream asking for its first token within 500 ms waited about 2 s behind another
    stream in a busy provider actor's backlog, then streamed from that provider as if on time:
    the time to first token counted from the backlog's end, not from when the call arrived."""

    def config(base_url: str) -> str:
        return config_text(base_url, models={"claude": "claude-opus-4-5-len-20-tps-10"})

    async with deployment(tmp_path, config, provider_options={"max_concurrency": 1}) as dep:
        results: dict[str, object] = {}
        holding = anyio.Event()

        async def holder() -> None:  # 20 chunks at 10 a second: the only slot for ~2 s
            async with dep.client.stream(prompt="a b", provider="claude", task_id="A") as s:
                async for _ in s:
                    holding.set()

        async def hurried() -> None:
            await holding.wait()
            async with dep.client.stream(
                prompt="a b",
                task_type="CodeGeneration",
                quality="High",
                latency_required_ms=500,
                task_id="B",
            ) as s:
                async for _ in s:
                    pass
            results["B"] = s.result

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            tg.start_soon(hurried)
    end = results["B"]
    assert isinstance(end, StreamEnd)
    first = end.attempts[0]
    assert first.provider == "claude" and first.outcome is not Outcome.OK
    assert end.provider != "claude"  # fell back before its first chunk, as DESIGN §4 says


async def test_a_capped_request_of_its_own_task_is_admitted_on_the_lease(tmp_path: Path) -> None:
    """With a per-task limit (the default config has one), every request is capped: reserving
    each capped attempt with the keeper left the routers' leases unused, a keeper round trip
    per paid call. A request whose task is its own (no task id, or one the client made up and
    said so) stays on the lease; a task id the caller chose, maybe for several requests at
    once on several routers, is reserved with the keeper."""
    from events.log import BudgetLeased
    from tests.fault.provider_harness import until

    budget = "[budget]\ndaily_limit_cents = 1000\nper_task_limit_cents = 50\nlease_cents = 100\n"

    def config(base_url: str) -> str:
        return config_text(base_url, budget=budget)

    async with deployment(tmp_path, config, keeper=True) as dep:
        router = dep.router
        assert router is not None
        await until(lambda: router.lease is not None)
        made_up = await dep.client.complete(prompt="hello", provider="openai")  # by the client
        reply = await dep.nc.request(  # no task id at all: the router names it
            "vapora.complete", b'{"prompt": "hello", "provider": "openai"}', timeout=10
        )
        unnamed = decode(reply.data, CompletionResult)
        await dep.client.complete(prompt="hello", provider="openai", task_id="T-named")
        events = await dep.events()
    leases = {e.lease_id for e in events if isinstance(e, BudgetLeased)}
    spends = {e.task_id: e for e in events if isinstance(e, SpendRecorded)}
    reserved = {e.task_id: e for e in events if isinstance(e, BudgetReserved)}
    for own in (made_up.task_id, unnamed.task_id):
        assert own not in reserved and spends[own].reservation_id in leases
    assert spends["T-named"].reservation_id == reserved["T-named"].reservation_id


async def test_a_hold_for_a_provider_with_no_actor_is_released_as_never_called(
    tmp_path: Path,
) -> None:
    """No claude provider actor runs: the attempt was never made, but its hold was released as
    ``failed`` (answered with a failure), not ``not_called``."""
    from events.log import BudgetReleased

    def config(base_url: str) -> str:
        return config_text(base_url, budget=BUDGET)

    async with deployment(tmp_path, config, keeper=True, providers=["openai", "gemini"]) as dep:
        done = await dep.client.complete(
            prompt="hello", task_type="CodeGeneration", quality="High", max_tokens=16
        )
        events = await dep.events_of(done.task_id)
    claude = {
        e.reservation_id for e in events if isinstance(e, BudgetReserved) and e.provider == "claude"
    }
    released = [e for e in events if isinstance(e, BudgetReleased) and e.reservation_id in claude]
    assert claude and [e.reason for e in released] == ["not_called"]


async def test_a_capped_tasks_fallback_fits_once_its_failed_attempt_is_given_back(
    tmp_path: Path,
) -> None:
    """The first provider answers a failure (nothing billed); the cap fits one attempt's hold,
    not two. The failed hold's release went out in the background, after the next provider's
    reservation, so the keeper still counted it and refused that fallback: every such task
    fell past the provider it could afford (a review: 30 of 30)."""

    def config(base_url: str) -> str:
        text = config_text(base_url, budget=BUDGET, models={"claude": "claude-opus-4-5-error-503"})
        return text.replace('name = "claude"', 'name = "claude"\nbreaker_threshold = 100000')

    async with deployment(tmp_path, config, keeper=True) as dep:
        ask = {"prompt": "hello", "task_type": "CodeReview", "max_tokens": 16}
        probe = await dep.client.complete(task_id="probe", budget_cents=Decimal(1000), **ask)
        assert probe.provider == "openai"
        held = [e for e in await dep.events_of("probe") if isinstance(e, BudgetReserved)]
        amounts = {e.provider: e.amount_usd for e in held}
        cap_cents = (amounts["openai"] + amounts["claude"]) * 100 - Decimal("0.0001")
        for i in range(5):
            result = await dep.client.complete(task_id=f"capped-{i}", budget_cents=cap_cents, **ask)
            attempts = [(a.provider, a.outcome) for a in result.attempts]
            assert attempts[0][0] == "claude" and result.provider == "openai", attempts
