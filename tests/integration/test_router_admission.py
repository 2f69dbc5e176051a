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
