"""Which attempts the router holds budget for: a paid provider's, never a zero-cost one's
(DESIGN §4, reservation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from events.log import BudgetReserved, SpendRecorded
from tests.fault.provider_harness import config_text, deployment

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
