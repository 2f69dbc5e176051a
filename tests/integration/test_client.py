"""``vapora.Client`` for other Python services, and ``vapora ask`` on top of it: results, streams,
reports and budgets decoded into the contract types; contract errors raised as our error tree;
silence raised as ``RequestTimeout``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

import vapora
from events.codec import encode
from events.contract import (
    BudgetStatus,
    CompletionRequest,
    CostReport,
    ErrorBody,
    ErrorReply,
    Tier,
)
from events.log import SpendRecorded
from tests.fault.provider_harness import config_text, deployment
from vapora.cli.ask import ask_command
from vapora.errors import (
    BudgetExceeded,
    InvalidRequest,
    NoProviderAvailable,
    RequestTimeout,
    UnknownProvider,
)

pytestmark = pytest.mark.anyio


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


async def test_connect_complete_and_stream_with_a_request_or_its_fields(tmp_path: Path) -> None:
    async with (
        deployment(tmp_path, guide()) as dep,
        vapora.Client.connect(dep.server.url) as client,
    ):
        by_fields = await client.complete(prompt="hello there", provider="openai")
        request = CompletionRequest(prompt="hello there", provider="openai", task_id="mine")
        by_request = await client.complete(request)
        assert by_fields.provider == by_request.provider == "openai"
        assert by_request.task_id == "mine" and by_fields.task_id != "mine"
        assert by_fields.text == by_request.text
        async with client.stream(prompt="hello there", provider="openai") as stream:
            text = "".join([part async for part in stream])
        assert text == by_fields.text
        assert stream.result is not None and stream.result.usage == by_fields.usage


async def test_contract_errors_are_raised_as_the_error_tree(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide()) as dep:
        client = dep.client
        with pytest.raises(UnknownProvider):
            await client.complete(prompt="x", provider="nope")
        with pytest.raises(InvalidRequest, match="temperature"):
            await client.complete(prompt="x", temperature=9)
        with pytest.raises(UnknownProvider):
            async for _ in client.stream(prompt="x", provider="nope"):
                pass


async def test_report_and_budget_decode_the_contract_and_raise_its_errors(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:
        client = dep.client
        with pytest.raises(NoProviderAvailable, match=r"vapora\.report"):
            await client.report()
        now = datetime(2026, 11, 26, tzinfo=UTC)
        report = CostReport(since=None, until=None, total_usd=Decimal("1.25"), calls=3)
        status = BudgetStatus(
            at=now,
            tier=Tier.NEAR_THRESHOLD,
            daily_limit_usd=Decimal(100),
            monthly_limit_usd=None,
            per_task_limit_usd=None,
            spent_today_usd=Decimal(60),
            spent_month_usd=Decimal(60),
            reserved_usd=Decimal(0),
            open_reservations=0,
            daily_percent=60.0,
            monthly_percent=0.0,
            warn_threshold_percent=90.0,
        )
        seen: list[bytes] = []

        async def ledger(msg: Msg) -> None:
            seen.append(msg.data)
            await msg.respond(encode(report))

        async def keeper(msg: Msg) -> None:
            error = ErrorReply(error=ErrorBody(code="budget_exceeded", message="over"))
            headers = {"Nats-Service-Error-Code": "402", "Nats-Service-Error": "over"}
            await dep.client.nc.publish(msg.reply, encode(error), headers=headers)

        await client.nc.subscribe("vapora.report", cb=ledger)
        got = await client.report(since=now)
        assert got == report
        assert json.loads(seen[0])["since"].startswith("2026-11-26")
        await client.nc.subscribe("vapora.budget", cb=keeper)
        with pytest.raises(BudgetExceeded, match="over"):
            await client.budget()
        assert status.tier is Tier.NEAR_THRESHOLD


async def test_silence_is_a_request_timeout(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:

        async def black_hole(msg: Msg) -> None:
            return None

        await dep.client.nc.subscribe("vapora.complete", cb=black_hole)
        await dep.client.nc.subscribe("vapora.stream", cb=black_hole)
        client = vapora.Client(dep.client.nc, timeout_s=0.3)
        with pytest.raises(RequestTimeout):
            await client.complete(prompt="anyone?")
        with pytest.raises(RequestTimeout):
            async for _ in client.stream(prompt="anyone?"):
                pass


async def _ask_a_sort(client: vapora.Client, *, budget_cents: int | None) -> tuple[int, str]:
    """`vapora ask` for code at High quality, not streamed: its status and what it printed."""
    out = io.StringIO()
    status = await ask_command(
        client,
        "write a sort",
        task_type="CodeGeneration",
        quality="High",
        provider=None,
        budget_cents=budget_cents,
        stream=False,
        as_json=False,
        out=out,
    )
    return status, out.getvalue()


async def test_ask_prints_what_the_task_cost_when_an_earlier_attempt_was_billed(
    tmp_path: Path,
) -> None:
    """Claude hangs past its timeout (billed at its upper bound: the request went out) and the
    next provider answers: `cost:` is the answer's alone, and the task cost more; the line
    under it says how much and where (the figure printed hid the first attempt's spend)."""
    config = guide(models={"claude": "claude-opus-4-5-hang"}, timeouts={"claude": 300})
    async with deployment(tmp_path, config) as dep:
        status, text = await _ask_a_sort(dep.client, budget_cents=None)
        spends = [e for e in await dep.events() if isinstance(e, SpendRecorded)]
    assert status == 0
    by_provider = {e.provider: e.cost_usd for e in spends}
    assert by_provider["claude"] > 0 and len(by_provider) == 2
    total = sum(by_provider.values(), Decimal(0))
    assert f"task:     ${total:f} in all, with claude ${by_provider['claude']:f} (timeout)" in text
    answer = next(cost for provider, cost in by_provider.items() if provider != "claude")
    assert f"cost:     ${answer:f}\n" in text


async def test_ask_prints_text_then_provider_model_tokens_cost_latency(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide()) as dep:
        status, text = await _ask_a_sort(dep.client, budget_cents=500)
        assert status == 0
        for label in ("provider: claude", "model:", "tokens:", "cost:     $", "latency:"):
            assert label in text
        out = io.StringIO()
        status = await ask_command(
            dep.client,
            "write a sort",
            task_type=None,
            quality=None,
            provider="ollama",
            budget_cents=None,
            stream=True,
            as_json=True,
            out=out,
        )
        assert status == 0
        document = json.loads(out.getvalue())
        assert document["provider"] == "ollama" and document["text"]
        err = io.StringIO()
        status = await ask_command(
            dep.client,
            "x",
            task_type=None,
            quality=None,
            provider="nope",
            budget_cents=None,
            stream=True,
            as_json=False,
            out=io.StringIO(),
            err=err,
        )
        assert status == 1 and "unknown_provider" in err.getvalue()


def _end(chunks: int | None) -> bytes:
    """A stream's end as the router sends it (``chunks``: how many chunk messages it sent)."""
    from events.contract import RouteDecision, StreamEnd, Usage

    return encode(
        StreamEnd(
            task_id="t-1",
            provider="openai",
            model="gpt-4o",
            finish_reason="stop",
            usage=Usage(input_tokens=3, output_tokens=3),
            cost_usd=Decimal("0.0001"),
            latency_ms=1.0,
            attempts=[],
            route=RouteDecision(chain=["openai"], reason="test", tier=Tier.NORMAL),
            chunks=chunks,
        )
    )


def _chunk(seq: int, text: str) -> bytes:
    from events.contract import StreamChunk

    return encode(StreamChunk(task_id="t-1", seq=seq, text=text))


async def test_a_stream_waits_for_chunks_its_end_overtook(tmp_path: Path) -> None:
    """On a cluster the router's end can arrive before the provider actor's last chunks (two
    publishers, two routes): the reader waits for the chunks the end counts, in order, and
    fails naming the missing one if it never comes, rather than return cut text."""
    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:
        nc = dep.client.nc
        plans: list[list[bytes]] = [
            [_chunk(0, "The "), _end(3), _chunk(2, "fox."), _chunk(1, "quick ")],
            [_chunk(0, "The "), _chunk(2, "fox."), _end(3)],  # chunk 1 lost for good
            [_chunk(0, "The "), _chunk(2, "fox."), _end(None)],  # an older router: no count
        ]

        async def fake_router(msg: Msg) -> None:
            for message in plans.pop(0):
                await nc.publish(msg.reply, message)

        await nc.subscribe("vapora.stream", cb=fake_router)
        client = vapora.Client(nc, timeout_s=1.0)
        stream = client.stream(prompt="hi")
        assert [text async for text in stream] == ["The ", "quick ", "fox."]
        assert stream.result is not None and stream.result.chunks == 3
        received: list[str] = []
        with pytest.raises(RequestTimeout, match="after 3 chunks, but chunk 1 never came"):
            async for text in client.stream(prompt="hi"):
                received.append(text)
        assert received == ["The "]
        stream = client.stream(prompt="hi")
        assert [text async for text in stream] == ["The ", "fox."]  # as before: what came


def _stream_error(code: str, message: str) -> bytes:
    from events.contract import StreamError

    return encode(StreamError(error=ErrorBody(code=code, message=message), task_id="t-1"))


async def test_a_stream_is_never_sent_twice_and_an_idle_timeout_cancels_it(
    tmp_path: Path,
) -> None:
    # Iterated again after its close, a stream published the whole request again (a second
    # task, billed, its chunks spliced onto the first's); a stream given up on by its idle
    # timeout was not cancelled: the provider went on and billed the whole answer.
    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:
        nc = dep.client.nc
        asked: list[Msg] = []
        cancels: list[bytes] = []

        async def fake_router(msg: Msg) -> None:
            asked.append(msg)
            await nc.publish(msg.reply, _chunk(0, "The "))  # then nothing more

        async def cancelled(msg: Msg) -> None:
            cancels.append(msg.data)

        await nc.subscribe("vapora.stream", cb=fake_router)
        await nc.subscribe("vapora.stream.cancel", cb=cancelled)
        client = vapora.Client(nc, timeout_s=5.0)
        async with client.stream(prompt="hi") as stream:
            assert await stream.__anext__() == "The "
        assert [text async for text in stream] == []  # closed: nothing, and nothing sent
        received: list[str] = []
        with pytest.raises(RequestTimeout):
            async for text in client.stream(prompt="hi", idle_timeout=0.3):
                received.append(text)
        # The cancel's round trip ends in this connection's own subscription task: waited for.
        with anyio.fail_after(5):
            while len(cancels) < 2:  # noqa: ASYNC110 - the callback's list
                await anyio.sleep(0.01)
        assert len(asked) == 2 and received == ["The "]
        assert len(cancels) == 2  # the closed one's and the timed-out one's


async def test_a_stream_only_iterated_and_left_early_is_cancelled(tmp_path: Path) -> None:
    # Without ``async with``, a ``break`` out of the loop left the stream open: vapora was never
    # told, the provider generated the whole answer and it was billed. Dropped, it is closed.
    import asyncio
    import gc

    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:
        nc = dep.client.nc
        cancels: list[bytes] = []
        got_cancel = asyncio.Event()

        async def fake_router(msg: Msg) -> None:
            await nc.publish(msg.reply, _chunk(0, "The "))
            await nc.publish(msg.reply, _chunk(1, "quick "))  # and more would follow

        async def cancelled(msg: Msg) -> None:
            cancels.append(msg.data)
            got_cancel.set()

        await nc.subscribe("vapora.stream", cb=fake_router)
        await nc.subscribe("vapora.stream.cancel", cb=cancelled)
        client = vapora.Client(nc, timeout_s=5.0)
        async for text in client.stream(prompt="hi"):
            assert text == "The "
            break
        gc.collect()
        await asyncio.wait_for(got_cancel.wait(), 5.0)
        assert len(cancels) == 1 and b"stream_to" in cancels[0]
        subscriptions = len(nc._subs)
        stream = client.stream(prompt="hi")
        assert await stream.__anext__() == "The "
        assert len(nc._subs) == subscriptions + 1
        got_cancel.clear()
        del stream
        gc.collect()
        await asyncio.wait_for(got_cancel.wait(), 5.0)
        assert len(cancels) == 2 and len(nc._subs) == subscriptions  # and unsubscribed
        # Dropped on another thread (the cyclic collector runs on any): closed on its own loop.
        stream = client.stream(prompt="hi")
        assert await stream.__anext__() == "The "
        holder, got_cancel = [stream], asyncio.Event()
        del stream

        def drop() -> None:
            holder.clear()
            gc.collect()

        await anyio.to_thread.run_sync(drop)
        await asyncio.wait_for(got_cancel.wait(), 5.0)
        assert len(cancels) == 3 and len(nc._subs) == subscriptions


async def test_stream_failures_are_raised_as_what_they_are(tmp_path: Path) -> None:
    # A stream broken after its first chunk came as ProviderRejected (the caller's error, not
    # to be retried); an overloaded router as InternalError (a bug, not "retry shortly").
    from vapora.errors import Overloaded, ProviderRejected, ProviderStreamBroken

    async with deployment(tmp_path, guide(), providers=[], router=False) as dep:
        nc = dep.client.nc
        plans = [
            [_chunk(0, "The "), _stream_error("provider_error", "openai: cut after 1 chunk")],
            [_stream_error("provider_error", "openai: HTTP 400 invalid_request_error")],
            [_stream_error("overloaded", "router is overloaded; retry shortly")],
        ]

        async def fake_router(msg: Msg) -> None:
            for message in plans.pop(0):
                await nc.publish(msg.reply, message)

        await nc.subscribe("vapora.stream", cb=fake_router)
        client = vapora.Client(nc, timeout_s=2.0)
        for expected in (ProviderStreamBroken, ProviderRejected, Overloaded):
            with pytest.raises(expected) as raised:
                async for _ in client.stream(prompt="hi"):
                    pass
            assert type(raised.value) is expected
        assert Overloaded.status == 503 and Overloaded.code == "overloaded"
