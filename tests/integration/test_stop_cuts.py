"""A provider actor stopped hard while a router's call runs on it: the call is cut, recorded as
``cancelled`` (what the provider billed is unknown), and the router keeps the attempt's hold, as
for a call that never answered. (Answered a plain 503, the router took the cut call for one that
billed nothing, released its reservation and paid another provider.)"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from actors.provider import ProviderActor
from events.log import BudgetReleased, BudgetReserved, CallFailed
from tests.fault.provider_harness import config_text, deployment, until
from vapora.client import CompletionResult

pytestmark = pytest.mark.anyio


def _config(url: str) -> str:
    slow = {"claude": "claude-opus-4-5-slow-5000"}
    return config_text(url, models=slow) + "[budget]\ndaily_limit_cents = 100000\n"


async def test_a_call_cut_by_its_actors_stop_keeps_its_hold(tmp_path: Path) -> None:
    async with deployment(
        tmp_path,
        _config,
        providers=["openai", "gemini"],
        keeper=True,
        router_options={"lease": False},
    ) as dep:
        claude = ProviderActor(dep.runtime, provider="claude")
        results: list[CompletionResult] = []

        async def call() -> None:
            results.append(
                await dep.client.complete(
                    prompt="write a function",
                    task_type="CodeGeneration",
                    quality="High",
                    task_id="T-cut",
                )
            )

        async with anyio.create_task_group() as outer, anyio.create_task_group() as claude_process:
            await claude_process.start(claude.run)
            outer.start_soon(call)
            await until(lambda: claude.service.in_flight > 0, within_s=8)
            await anyio.sleep(0.5)  # the provider is answering (it takes 5 s)
            started = anyio.current_time()
            claude_process.cancel_scope.cancel()  # a hard stop of that actor's process
        # The cut is answered at once, and the endpoint is off the server: the router's retry
        # finds no claude actor instead of waiting out the call's timeout on its subscription.
        assert anyio.current_time() - started < 5
        [result] = results
        events = await dep.events_of("T-cut")
    assert result.provider != "claude"
    [cut] = [e for e in events if isinstance(e, CallFailed) and e.provider == "claude"]
    assert cut.error_class == "cancelled"
    # The cut call's reservation stays (it may have been billed); the router's retry of that
    # silent attempt found no claude actor (never called), and that one is given back.
    first, *retries = [
        e.reservation_id for e in events if isinstance(e, BudgetReserved) and e.provider == "claude"
    ]
    released = {e.reservation_id for e in events if isinstance(e, BudgetReleased)}
    assert first not in released
    assert set(retries) <= released
    claude_attempts = [a for a in result.attempts if a.provider == "claude"]
    assert claude_attempts and claude_attempts[0].error_code == "cancelled"
