"""A provider actor paused mid-call (SIGSTOP: ``docker pause``, a frozen VM, a stalled disk)
for longer than the call's hold lives: the keeper released the hold as expired, admitted other
work into that room, and when the actor resumed it recorded the call's spend, 50 % past a
day's limit in a review. The router that reserved the hold now says it is pending
(``vapora.budget.pending``) until its spend arrives, and the keeper expires none of it. Real
nats-server, the simulator over HTTP, the provider actor a real OS process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

from actors.budget_keeper import BudgetKeeper
from actors.provider import DEADLINE_HEADER, SPEND_ID_HEADER
from actors.router import RouterActor
from events.codec import decode, encode
from events.contract import (
    AttemptsUnbilled,
    ProviderCall,
    ProviderCallResult,
    StreamCancel,
    TaskType,
)
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    CallFailed,
    CallSucceeded,
    Event,
    RouteDecided,
    SpendRecorded,
)
from tests.fault.money import FakeClock, running
from tests.fault.provider_harness import (
    KEYS,
    Deployment,
    config_text,
    deployment,
    wait_until_served,
)
from tests.fault.provider_process import started
from vapora.errors import VaporaError

pytestmark = pytest.mark.anyio


RESERVED = "[budget]\ndaily_limit_cents = 8\nlease_cents = 0\n"
LEASED = "[budget]\ndaily_limit_cents = 100\nlease_cents = 50\n"  # a lease covers the bound


def _config(budget: str) -> Callable[[str], str]:
    def text(url: str) -> str:
        return config_text(
            url,
            models={"openai": "gpt-4-slow-800"},  # answered 0.8 s after the request
            timeouts={"openai": 1000},  # the router gives up on a silent actor after ~2 s
            budget=budget,
        )

    return text


async def _provider_process(url: str, tmp_path: Path, config: str) -> subprocess.Popen[bytes]:
    """The openai provider actor in a process of its own, with ``config``, ready."""
    config_file, data_dir = tmp_path / "vapora.toml", tmp_path / "provider"
    config_file.write_text(config)
    data_dir.mkdir()
    return await started(url, config_file, data_dir, KEYS)


@contextlib.asynccontextmanager
async def _paused_later(
    tmp_path: Path, config: Callable[[str], str]
) -> AsyncIterator[tuple[Deployment, subprocess.Popen[bytes], RouterActor]]:
    """The keeper, a router and the openai provider actor in a process of its own (for the
    test to pause), serving; the router stopped and the process killed on the way out."""
    async with deployment(tmp_path, config, router=False, providers=[]) as dep:
        worker = await _provider_process(dep.server.url, tmp_path, config(dep.sim.base_url))
        try:
            async with (
                running(BudgetKeeper(dep.runtime, tick_s=0.2)),
                anyio.create_task_group() as tg,
            ):
                router = RouterActor(dep.runtime, reserve=True)
                await tg.start(router.run)
                await wait_until_served(dep.client.nc, "vapora.complete")
                yield dep, worker, router
                router.stop()
        finally:
            worker.send_signal(signal.SIGCONT)
            worker.send_signal(signal.SIGKILL)
            worker.wait()


async def _called(events: Callable[[], Awaitable[list[Event]]]) -> int:
    """How many routes the router decided (each one's attempt goes out next)."""
    return sum(isinstance(e, RouteDecided) for e in await events())


async def _spends(events: Callable[[], Awaitable[list[Event]]], task_id: str) -> int:
    return sum(isinstance(e, SpendRecorded) and e.task_id == task_id for e in await events())


async def _spent(events: Callable[[], Awaitable[list[Event]]], reservation_id: str) -> bool:
    return any(
        isinstance(e, SpendRecorded) and e.reservation_id == reservation_id for e in await events()
    )


@pytest.mark.parametrize("leased", [False, True], ids=["reserved", "leased"])
async def test_a_paused_provider_actors_hold_does_not_expire_while_its_router_runs(
    tmp_path: Path, leased: bool
) -> None:
    """Reserved: the attempt's own reservation (120 s). Leased (the default): the router's lease
    the attempt was admitted against (300 s), whose expiry freed what the attempt committed."""
    budget = LEASED if leased else RESERVED
    async with deployment(tmp_path, _config(budget), router=False, providers=[]) as dep:
        worker = await _provider_process(
            dep.server.url, tmp_path, _config(budget)(dep.sim.base_url)
        )
        try:
            clock = FakeClock(datetime.now(UTC))
            keeper = BudgetKeeper(dataclasses.replace(dep.runtime, clock=clock), tick_s=0.2)

            async def events() -> list[Event]:
                return [e.event async for b in dep.log.replay() for e in b]

            cancels: list[StreamCancel] = []

            async def cancelled(message: Msg) -> None:
                cancels.append(decode(message.data, StreamCancel))

            await dep.nc.subscribe("vapora.stream.cancel", cb=cancelled)
            async with running(keeper), anyio.create_task_group() as tg:
                router = RouterActor(dep.runtime, reserve=True)
                router.silent_word_s = 0.1  # said often, as the keeper's clock runs fast
                await tg.start(router.run)
                await wait_until_served(dep.client.nc, "vapora.complete")
                answered: list[object] = []

                async def call() -> None:  # a stream: its silent attempt is not retried
                    try:
                        async with dep.client.stream(
                            prompt="write a function", provider="openai", max_tokens=2000,
                            task_id="P1",
                        ) as stream:  # fmt: skip
                            async for _ in stream:
                                pass
                    except VaporaError as exc:
                        answered.append(exc)

                held = BudgetLeased if leased else BudgetReserved
                earlier = 0
                if leased:
                    with anyio.fail_after(10):
                        while not [e for e in await events() if isinstance(e, held)]:  # noqa: ASYNC110
                            await anyio.sleep(0.02)
                    # An earlier request of the same task answered on the same lease: its
                    # spend has the same lease, task and attempt number as the silent one's
                    # (a review found the silent hold then never kept).
                    await dep.client.complete(
                        prompt="hi", provider="openai", max_tokens=50, task_id="P1"
                    )
                    earlier = 1
                    with anyio.fail_after(10):
                        while await _spends(events, "P1") < 1:  # noqa: ASYNC110
                            await anyio.sleep(0.02)
                tg.start_soon(call)
                with anyio.fail_after(10):
                    while await _called(events) <= earlier:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                await anyio.sleep(0.3)  # the actor has the call; the simulator answers later
                worker.send_signal(signal.SIGSTOP)
                with anyio.fail_after(20):  # the router gives up on the silent attempts
                    while not answered:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                # ...and cancels the stream: the actor, paused and not dead, stops streaming
                # to a caller told it failed (its chunks came after the error, in a review).
                with anyio.fail_after(5):
                    while not cancels:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                assert cancels[0].stream_to.startswith("_INBOX.")
                for _ in range(20):  # the pause outlasts the hold (at most 300 s): 400 s pass
                    clock.advance(20)
                    await anyio.sleep(0.3)
                logged = await events()
                freed = [e for e in logged if isinstance(e, BudgetReleased | BudgetLeaseReturned)]
                assert not freed, [e.reason for e in freed]
                first = next(
                    e.lease_id if isinstance(e, BudgetLeased) else e.reservation_id
                    for e in logged
                    if isinstance(e, held)
                )
                assert leased is not any(isinstance(e, BudgetReserved) for e in logged)
                worker.send_signal(signal.SIGCONT)  # the actor records what it was billed
                with anyio.fail_after(20):
                    while await _spends(events, "P1") <= earlier:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                assert await _spent(events, first)
                router.stop()
            logged = await events()
        finally:
            worker.send_signal(signal.SIGCONT)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    expired = [e for e in logged if isinstance(e, BudgetReleased | BudgetLeaseReturned)
               and e.reason == "expired"]  # fmt: skip
    assert not expired


@pytest.mark.parametrize("leased", [False, True], ids=["reserved", "leased"])
async def test_a_call_the_paused_actor_then_ends_unbilled_gives_its_hold_back(
    tmp_path: Path, leased: bool
) -> None:
    """The router keeps a silent attempt's hold for up to an hour; when the actor resumes and
    a call ends with nothing billed (here the retry, read past its router's deadline: not made;
    before deadlines, a 429), the actor releases the hold itself and tells
    the routers (``vapora.budget.unbilled``): the router that stopped waiting would not, and
    the budget's room stayed locked that hour (a lease's until the night of 2026-11-27: the
    keeper ignores a release of a lease, and only the router can stop saying it pending)."""
    budget = LEASED if leased else RESERVED

    def config(url: str) -> str:
        return config_text(
            url,
            models={"openai": "gpt-4-slow-800-error-429"},  # refused, 0.8 s after the request
            timeouts={"openai": 1000},
            budget=budget,
        )

    async with _paused_later(tmp_path, config) as (dep, worker, router):

        async def events() -> list[Event]:
            return [e.event async for b in dep.log.replay() for e in b]

        async def call() -> None:
            with contextlib.suppress(VaporaError):
                await dep.client.complete(
                    prompt="hi", provider="openai", max_tokens=500, task_id="P2"
                )

        if leased:
            with anyio.fail_after(10):
                while not [e for e in await events() if isinstance(e, BudgetLeased)]:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(10):
                while not await _called(events):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await anyio.sleep(0.3)
            worker.send_signal(signal.SIGSTOP)
            with anyio.fail_after(20):  # silent: kept by the router
                while len(router._silent_holds) < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await anyio.sleep(2)
            worker.send_signal(signal.SIGCONT)  # nothing billed, past its wait
            with anyio.fail_after(20):
                while router._silent_holds:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        logged = await events()
    # The first call timed out in the actor's own clock while it was paused (it may have been
    # billed: recorded at its bound, settling its hold); the retry, read after the pause past
    # its deadline, was not made, and the actor released its hold (a reservation) and said so
    # (a lease's: the keeper ignores its release). None waits for the hour.
    spent = [e.reservation_id for e in logged if isinstance(e, SpendRecorded)]
    released = {e.reservation_id: e.reason for e in logged if isinstance(e, BudgetReleased)}
    if leased:
        [lease] = {e.lease_id for e in logged if isinstance(e, BudgetLeased)}
        assert spent == [lease] and not released
    else:
        first, retry = (e.reservation_id for e in logged if isinstance(e, BudgetReserved))
        assert spent == [first] and released == {retry: "not_called"}


@pytest.mark.parametrize("given", ["not-an-id", "A" * 32, "0" * 33, ""])
async def test_a_spend_id_header_that_is_not_one_is_not_taken(tmp_path: Path, given: str) -> None:
    """``Vapora-Spend-Id`` comes from whoever publishes the call: a value that is not 32
    lowercase hex digits is not used as the spend's event id (the actor's own is), and the call
    is served as any other."""
    async with deployment(tmp_path, _config(RESERVED), router=False, providers=["openai"]) as dep:
        call = ProviderCall(
            task_id="S1", task_type=TaskType.GENERAL_QUERY, attempt=1, model="gpt-4-slow-800",
            prompt="hi", max_tokens=16, reservation_id="r-1",
        )  # fmt: skip
        reply = await dep.nc.request(
            "vapora.provider.openai.call",
            encode(call),
            timeout=10,
            headers={SPEND_ID_HEADER: given},
        )
        assert decode(reply.data, ProviderCallResult).text
        with anyio.fail_after(10):
            while not [e for e in await dep.events_of("S1") if isinstance(e, SpendRecorded)]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        [spend] = [e for e in await dep.events_of("S1") if isinstance(e, SpendRecorded)]
    assert spend.id != given and len(spend.id) == 32


async def test_notices_that_are_not_ones_are_named_and_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``vapora.budget.unbilled`` (to routers) and ``vapora.budget.pending`` (to the keeper)
    come from whoever may publish on them: a body that is not a notice is logged, naming what
    is wrong, and drops no hold; a notice of an attempt the router does not wait for changes
    nothing; one that it waits for ends its hold's word."""
    caplog.set_level(logging.WARNING)
    async with deployment(tmp_path, _config(RESERVED), providers=["openai"], keeper=True) as dep:
        assert dep.router is not None
        waiting = "a" * 32
        dep.router._silent_holds[waiting] = ("r-1", float("inf"))
        bad = [b"", b"[]", b'{"spend_ids": []}', b'{"spend_ids": ["xyz"]}', b"\xff", b'{"x": 1}']
        for body in bad:
            await dep.client.nc.publish("vapora.budget.unbilled", body)
            await dep.client.nc.publish("vapora.budget.pending", body)
        other = encode(AttemptsUnbilled(spend_ids=["b" * 32]))
        await dep.client.nc.publish("vapora.budget.unbilled", other)
        await dep.client.nc.flush()
        with anyio.fail_after(10):
            while sum("notice that is not one" in r.message for r in caplog.records) < 2 * len(bad):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert dep.router._silent_holds == {waiting: ("r-1", float("inf"))}
        await dep.client.nc.publish(
            "vapora.budget.unbilled", encode(AttemptsUnbilled(spend_ids=[waiting]))
        )
        with anyio.fail_after(10):
            while dep.router._silent_holds:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        answer = await dep.client.complete(prompt="hi", provider="openai", max_tokens=16)
        assert answer.text
    said = [r.message for r in caplog.records if "notice that is not one" in r.message]
    assert any("spend_ids" in line and "xyz" not in line for line in said), said


async def test_a_call_read_after_its_router_stopped_waiting_is_not_made(tmp_path: Path) -> None:
    """An actor paused before the call reached it: the call sat unread in its socket, so the
    actor's own measure of its wait saw none, and when it resumed it made the call (billed)
    for a task whose caller had had its error long before (a review). The router's
    ``Vapora-Deadline`` says when it stopped waiting: such a call is refused, not made, and
    its hold given back."""
    async with _paused_later(tmp_path, _config(RESERVED)) as (dep, worker, _):
        worker.send_signal(signal.SIGSTOP)
        with pytest.raises(VaporaError):  # both attempts silent: no provider answered
            await dep.client.complete(prompt="hi", provider="openai", max_tokens=500, task_id="P4")
        # Past the clocks' tolerance of the retry's deadline (the first one's is 2 s earlier),
        # it reads both calls.
        await anyio.sleep(1.5)
        worker.send_signal(signal.SIGCONT)

        async def released() -> list[BudgetReleased]:
            return [e for e in await dep.events_of("P4") if isinstance(e, BudgetReleased)]

        with anyio.fail_after(20):
            while len(await released()) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await anyio.sleep(1.5)  # (a call made would have been answered by now)
        logged = await dep.events_of("P4")
    made = [e for e in logged if isinstance(e, CallSucceeded | CallFailed | SpendRecorded)]
    assert not made, made
    reserved = [e.reservation_id for e in logged if isinstance(e, BudgetReserved)]
    assert len(reserved) == 2
    assert {
        e.reservation_id: e.reason for e in logged if isinstance(e, BudgetReleased)
    } == dict.fromkeys(reserved, "not_called")


@pytest.mark.parametrize(
    ("model", "deadline"), [("gpt-4-error-429", 10**13), ("gpt-4", 1)], ids=["429", "deadline"]
)
async def test_a_call_ended_unbilled_is_said_to_the_routers_by_its_spend_id(
    tmp_path: Path, model: str, deadline: int
) -> None:
    """A provider actor names the spend id of a call it ended with nothing billed (a 429) or
    did not make (read past its deadline) on ``vapora.budget.unbilled``, for a router that
    stopped waiting for it; a call it made and billed is not named."""
    async with deployment(tmp_path, _config(RESERVED), router=False, providers=["openai"]) as dep:
        said: list[AttemptsUnbilled] = []

        async def heard(message: Msg) -> None:
            said.append(decode(message.data, AttemptsUnbilled))

        await dep.nc.subscribe("vapora.budget.unbilled", cb=heard)
        # (the billed one first: after a 429 the actor calls no one for a second)
        calls = [("U2", "b" * 32, "gpt-4", 10**13), ("U1", "a" * 32, model, deadline)]
        for task_id, spend_id, asked, by in calls:
            call = ProviderCall(
                task_id=task_id, task_type=TaskType.GENERAL_QUERY, attempt=1, model=asked,
                prompt="hi", max_tokens=16, reservation_id=f"r-{task_id}",
            )  # fmt: skip
            headers = {SPEND_ID_HEADER: spend_id, DEADLINE_HEADER: str(by)}
            await dep.nc.request(
                "vapora.provider.openai.call", encode(call), timeout=10, headers=headers
            )

        async def billed() -> bool:
            return any(isinstance(e, SpendRecorded) for e in await dep.events_of("U2"))

        with anyio.fail_after(10):
            while not said or not await billed():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)  # (a word for the billed call would have come by now)
    assert said == [AttemptsUnbilled(spend_ids=["a" * 32])]
