"""The provider actor appends ``provider_health_changed`` only when availability changes: none
after the usual successful call, one as soon as a failure opens the breaker (DESIGN §2)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from events.log import ProviderHealthChanged
from tests.fault.provider_harness import config_text, deployment, until

pytestmark = pytest.mark.anyio


async def test_health_is_appended_on_changes_only(tmp_path: Path) -> None:
    options = {"breaker_threshold": 1, "breaker_cooldown_s": 60.0, "health_interval_s": 3600.0}
    async with deployment(tmp_path, config_text, provider_options=options) as dep:

        async def health() -> list[ProviderHealthChanged]:
            events = await dep.events()
            return [e for e in events if isinstance(e, ProviderHealthChanged)]

        async def openai_states() -> list[tuple[bool, str]]:
            return [(e.available, e.breaker) for e in await health() if e.provider == "openai"]

        for _ in range(20):
            await dep.client.complete(prompt="hello", provider="openai")
        assert await openai_states() == [(True, "closed")]  # announced at start, then nothing
        dep.sim.control({"provider": "openai", "fail_next": 1, "fail_with": "error-500"})
        with pytest.raises(Exception):  # noqa: B017 - an override has no fallback
            await dep.client.complete(prompt="hello", provider="openai")
        with anyio.fail_after(10):
            while True:
                if await openai_states() == [(True, "closed"), (False, "open")]:
                    break
                await anyio.sleep(0.02)
        router = dep.router
        assert router is not None
        await until(lambda: router.views["openai"].breaker_open)
