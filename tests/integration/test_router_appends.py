"""The router's own events are appended in the background but joined before the answer: a task's
reply never reaches the caller before its ``route_decided`` is stored (DESIGN §3, the log)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.router import RouterActor
from events.log import Event, RouteDecided
from tests.fault.provider_harness import config_text, deployment, wait_until_served
from vapora.errors import VaporaError

pytestmark = pytest.mark.anyio


async def test_the_answer_waits_for_the_routers_events(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, config_text) as dep:
        router = dep.router
        assert router is not None
        release, held = anyio.Event(), anyio.Event()
        append_many = dep.log.append_many

        async def gated(events: Sequence[Event], **kw: Any) -> Any:
            if any(isinstance(e, RouteDecided) for e in events):
                held.set()
                await release.wait()
            return await append_many(events, **kw)

        replied = anyio.Event()
        call = router._call

        async def observed_call(*args: Any) -> Any:
            outcome = await call(*args)
            replied.set()  # the provider actor has answered the router
            return outcome

        dep.log.append_many = gated  # type: ignore[method-assign]
        router._call = observed_call  # type: ignore[method-assign,assignment]
        order: list[str] = []
        results: list[Any] = []

        async def ask() -> None:
            results.append(await dep.client.complete(prompt="hello", provider="openai"))
            order.append("answered")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                await held.wait()
                await replied.wait()
                await anyio.sleep(0.2)  # room for a reply that did not wait (none may come)
                order.append("released")
                release.set()
        assert order == ["released", "answered"]
        [result] = results
        events = await dep.events_of(result.task_id)  # held back here, so stored last
        assert [type(e) for e in events].count(RouteDecided) == 1


async def test_a_router_stops_with_an_append_in_flight_and_cancels_it(tmp_path: Path) -> None:
    async with deployment(tmp_path, config_text, router=False) as dep:
        router = RouterActor(dep.runtime)
        router.service.drain_timeout = 0.5
        held, cancelled = anyio.Event(), anyio.Event()
        append_many = dep.log.append_many

        async def stuck(events: Sequence[Event], **kw: Any) -> Any:
            if any(isinstance(e, RouteDecided) for e in events):
                held.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    cancelled.set()
            return await append_many(events, **kw)

        dep.log.append_many = stuck  # type: ignore[method-assign]

        async def ask() -> None:
            with contextlib.suppress(VaporaError):
                await dep.client.complete(prompt="hello", provider="openai")

        with anyio.fail_after(20):
            async with anyio.create_task_group() as callers:
                async with anyio.create_task_group() as serving:
                    await serving.start(router.run)
                    await wait_until_served(dep.client.nc, "vapora.complete")
                    callers.start_soon(ask)
                    await held.wait()
                    router.stop()
                # run() returned: drained, and the append still in flight was cancelled
                assert cancelled.is_set()
                callers.cancel_scope.cancel()
