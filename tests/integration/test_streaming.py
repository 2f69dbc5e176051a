"""Streaming end to end: chunks go from the provider actor straight to the caller in order, then
``end``; fallback only before the first chunk; a cut after it ends with ``error`` and the partial
usage is billed (DESIGN §3 stream messages, §4 fallback)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from events.contract import Outcome, StreamChunk, StreamEnd, StreamError, StreamMessage
from events.log import CallFailed, CallSucceeded, FallbackTriggered, SpendRecorded
from tests.fault.provider_harness import config_text, deployment
from vapora.cli.ask import ask_command
from vapora.client import Client
from vapora.errors import ProviderStreamBroken
from vapora.pricing import cost

pytestmark = pytest.mark.anyio

_decoder: msgspec.json.Decoder[StreamMessage] = msgspec.json.Decoder(StreamMessage)  # type: ignore[arg-type]


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


LONG = {
    "claude": "claude-opus-4-5-len-40",
    "openai": "gpt-4-len-40",
    "gemini": "gemini-2.0-flash-len-40",
    "ollama": "llama2-len-40",
}


@pytest.mark.parametrize("provider", ["claude", "openai", "gemini", "ollama"])
async def test_a_stream_from_each_provider_kind_arrives_in_order_then_ends(
    tmp_path: Path, provider: str
) -> None:
    async with deployment(tmp_path, guide(models=LONG), providers=[provider]) as dep:
        nc = dep.client.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = b'{"prompt": "one two three four five", "provider": "%s"}' % provider.encode()
        await nc.publish("vapora.stream", body, reply=inbox)
        messages = []
        while True:
            message = _decoder.decode((await sub.next_msg(timeout=10)).data)
            messages.append(message)
            if not isinstance(message, StreamChunk):
                break
        chunks, end = messages[:-1], messages[-1]
        assert isinstance(end, StreamEnd), end
        assert len(chunks) > 1
        assert [c.seq for c in chunks] == list(range(len(chunks)))  # arrival order is seq order
        assert {c.task_id for c in chunks} == {end.task_id}
        text = "".join(c.text for c in chunks)
        assert len(text.split()) == 40
        assert end.provider == provider and end.usage.output_tokens > 0
        price = dep.runtime.config.provider(provider).price  # type: ignore[union-attr]
        assert end.cost_usd == cost(end.usage, price)
        assert [a.outcome for a in end.attempts] == [Outcome.OK]
        # The same through the client, as an async iterator.
        async with dep.client.stream(prompt="one two three", provider=provider) as stream:
            parts = [part async for part in stream]
        assert stream.result is not None and stream.result.provider == provider
        assert "".join(parts) == stream.text and len(parts) > 1


async def test_a_first_token_timeout_falls_back_before_anything_was_sent(tmp_path: Path) -> None:
    models = {**LONG, "claude": "claude-opus-4-5-ttft-3000-len-40"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        async with dep.client.stream(
            prompt="write code",
            task_type="CodeGeneration",
            quality="High",
            latency_required_ms=300,
            task_id="ttft",
        ) as stream:
            text = "".join([part async for part in stream])
        end = stream.result
        assert end is not None
        assert end.provider != "claude" and len(text.split()) == 40
        assert [(a.provider, a.outcome) for a in end.attempts] == [
            ("claude", Outcome.TIMEOUT),
            (end.provider, Outcome.OK),
        ]
        events = await dep.events_of("ttft")
        assert [e.from_provider for e in events if isinstance(e, FallbackTriggered)] == ["claude"]


async def test_a_cut_after_the_first_chunk_ends_with_error_and_the_partial_usage_is_billed(
    tmp_path: Path,
) -> None:
    models = {**LONG, "claude": "claude-opus-4-5-len-40-cut-3"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        stream = dep.client.stream(
            prompt="write code", task_type="CodeGeneration", quality="High", task_id="cut"
        )
        received = []
        # provider_error after a chunk: no fallback, and not the caller's error
        with pytest.raises(ProviderStreamBroken):
            async for part in stream:
                received.append(part)
        assert received, "the first chunks reached the caller"
        assert stream.result is None and stream.error is not None
        assert stream.usage is not None and stream.usage.input_tokens > 0
        price = dep.runtime.config.provider("claude").price  # type: ignore[union-attr]
        assert stream.cost_usd == cost(stream.usage, price) > 0
        events = await dep.events_of("cut")
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        assert failed.after_first_chunk and failed.usage == stream.usage
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert (spend.provider, spend.cost_usd) == ("claude", stream.cost_usd)
        assert not [e for e in events if isinstance(e, FallbackTriggered)]


async def test_ask_stream_says_what_a_broken_stream_billed(tmp_path: Path) -> None:
    models = {**LONG, "claude": "claude-opus-4-5-len-40-cut-3"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        out, err = io.StringIO(), io.StringIO()
        assert await _ask_stream(dep.client, as_json=False, out=out, err=err) == 1
        [line, failure] = err.getvalue().splitlines()
        billed = re.fullmatch(
            r"vapora: the stream broke after (\d+) characters; billed (\d+) in, (\d+) out, "
            r"\$([0-9.]+) \(task (\S+)\)",
            line,
        )
        assert billed is not None, line
        assert failure.startswith("vapora: provider_error: ")
        assert int(billed[1]) == len(out.getvalue().rstrip("\n")) > 0
        [spend] = [e for e in await dep.events_of(billed[5]) if isinstance(e, SpendRecorded)]
        assert (spend.input_tokens, spend.output_tokens) == (int(billed[2]), int(billed[3]))
        assert spend.cost_usd == Decimal(billed[4]) > 0
        out = io.StringIO()
        assert await _ask_stream(dep.client, as_json=True, out=out, err=io.StringIO()) == 1
        document = json.loads(out.getvalue())
        assert document["type"] == "error" and document["error"]["code"] == "provider_error"
        [spend] = [
            e for e in await dep.events_of(document["task_id"]) if isinstance(e, SpendRecorded)
        ]
        assert Decimal(document["cost_usd"]) == spend.cost_usd and document["text"]
        assert document["usage"]["output_tokens"] == spend.output_tokens


async def _ask_stream(client: Client, *, as_json: bool, out: io.StringIO, err: io.StringIO) -> int:
    return await ask_command(
        client,
        "write code",
        task_type="CodeGeneration",
        quality="High",
        stream=True,
        as_json=as_json,
        out=out,
        err=err,
    )


async def test_a_stream_error_before_any_chunk_falls_back(tmp_path: Path) -> None:
    models = {**LONG, "claude": "claude-opus-4-5-error-529"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        async with dep.client.stream(
            prompt="write code", task_type="CodeGeneration", quality="High"
        ) as stream:
            text = "".join([part async for part in stream])
        assert stream.result is not None and stream.result.provider != "claude"
        assert len(text.split()) == 40


async def test_stream_errors_use_the_stream_error_message(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide()) as dep:
        nc = dep.client.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("vapora.stream", b'{"prompt": "x", "provider": "nope"}', reply=inbox)
        reply = await sub.next_msg(timeout=5)
        message = _decoder.decode(reply.data)
        assert isinstance(message, StreamError)
        assert message.error.code == "unknown_provider"
        assert (reply.headers or {})["Nats-Service-Error-Code"] == "404"


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        (b'{"prompt": "x", "colour": "red"}', "400", "colour"),  # an unknown field
        (b"not json", "400", "JSON"),
        (b'{"prompt": "x", "quality": "Sublime"}', "400", "quality"),  # a bad enum value
        (b'["prompt"]', "400", "object"),
    ],
)
async def test_a_stream_request_refused_before_routing_ends_with_the_stream_error_message(
    tmp_path: Path, body: bytes, status: str, named: str
) -> None:
    """Errors the service answered itself (the request unreadable, overload, a stop) had the
    plain error body, so a reader of the stream's messages could not decode them."""
    async with deployment(tmp_path, guide()) as dep:
        nc = dep.client.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("vapora.stream", body, reply=inbox)
        reply = await sub.next_msg(timeout=5)
        message = _decoder.decode(reply.data)
        assert isinstance(message, StreamError)
        assert message.error.code == "invalid_request"
        assert named in message.error.message
        assert (reply.headers or {})["Nats-Service-Error-Code"] == status
        # vapora.complete keeps the plain error body.
        plain = await nc.request("vapora.complete", body, timeout=5)
        assert msgspec.json.decode(plain.data) == {
            "error": msgspec.json.decode(reply.data)["error"]
        }


async def test_a_stream_its_caller_stops_reading_stops_the_provider_and_bills_what_came(
    tmp_path: Path,
) -> None:
    """A caller that left after a few chunks did not stop the provider call: it streamed to its
    end and the caller paid for every token nobody read. Closing the stream early now cancels
    it (``vapora.stream.cancel``): the provider's generation is cut, what it generated until
    then is billed once, and the task does not fall back."""
    import anyio

    models = {"claude": "claude-opus-4-5-len-40-tps-20"}  # 40 chunks over two seconds
    async with deployment(tmp_path, guide(models=models), keeper=True) as dep:
        async with dep.client.stream(
            prompt="a b", task_type="CodeGeneration", quality="High", task_id="left"
        ) as stream:
            read = []
            async for chunk in stream:
                read.append(chunk)
                if len(read) == 3:
                    break
        assert len(read) == 3 and stream.error is None

        async def recorded() -> list[object]:
            return [e for e in await dep.events_of("left") if isinstance(e, SpendRecorded)]

        with anyio.fail_after(10):
            while not await recorded():  # noqa: ASYNC110 - the log is polled
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # anything else it would have recorded
        events = await dep.events_of("left")
        breaker_failures = dep.providers["claude"].breaker.failures
    [failed] = [e for e in events if isinstance(e, CallFailed)]
    assert (failed.error_code, failed.error_class) == ("cancelled_by_caller", "stream_broken")
    assert failed.after_first_chunk
    assert breaker_failures == 0  # the caller's choice, not the provider's failure
    [spend] = [e for e in events if isinstance(e, SpendRecorded)]
    assert spend.provider == "claude" and spend.cost_usd > 0
    assert spend.output_tokens < 40  # not the whole answer: the generation was stopped
    assert not [e for e in events if isinstance(e, FallbackTriggered)]


async def test_a_stream_cancelled_before_its_call_came_is_not_called(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from events.codec import encode
    from events.contract import StreamCancel

    async with deployment(tmp_path, guide()) as dep:
        nc = dep.client.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        huge = msgspec.json.encode({"Q" * 300_000: 1})
        with caplog.at_level("WARNING", logger="vapora.provider"):
            for garbage in (b"not json", b"{}", b'{"stream_to": ""}', huge):  # passed by
                await nc.publish("vapora.stream.cancel", garbage)
            await nc.flush()
            await anyio.sleep(0.2)
        # Said once a minute per actor, cut short (anyone may publish there: a message of
        # 300,000 characters was written whole by every provider actor, each time).
        said = [
            r.getMessage()
            for r in caplog.records
            if "a stream cancel that is not" in r.getMessage()
        ]
        assert 1 <= len(said) <= len(dep.providers), said
        assert all(len(line) < 1_000 for line in said)
        await nc.publish("vapora.stream.cancel", encode(StreamCancel(stream_to=inbox)))
        await nc.flush()
        body = {"prompt": "hi", "task_type": "CodeGeneration", "quality": "High", "task_id": "c0"}
        await nc.publish("vapora.stream", msgspec.json.encode(body), reply=inbox)
        message = _decoder.decode((await sub.next_msg(timeout=10)).data)
        events = await dep.events_of("c0")
    assert isinstance(message, StreamError)
    assert "stopped reading the stream before it began" in message.error.message
    assert not [e for e in events if isinstance(e, FallbackTriggered | SpendRecorded)]
    assert not [r for r in dep.sim.requests if r.provider == "anthropic"]


async def test_a_stream_cancelled_while_its_provider_actor_drains_is_still_stopped(
    tmp_path: Path,
) -> None:
    """A provider actor that stops lets its calls in flight finish; it stopped listening for
    cancels first, so a caller that left during the drain paid for the whole answer."""
    import anyio

    models = {"claude": "claude-opus-4-5-len-40-tps-20"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        async with dep.client.stream(
            prompt="a b", task_type="CodeGeneration", quality="High", task_id="drain"
        ) as stream:
            async for _ in stream:
                dep.providers["claude"].stop()  # draining: the call goes on
                await anyio.sleep(0.2)
                break

        async def recorded() -> list[object]:
            return [e for e in await dep.events_of("drain") if isinstance(e, CallFailed)]

        with anyio.fail_after(10):
            while not await recorded():  # noqa: ASYNC110 - the log is polled
                await anyio.sleep(0.05)
        [failed] = await recorded()
    assert isinstance(failed, CallFailed) and failed.error_code == "cancelled_by_caller"


async def test_a_closed_stream_is_never_sent_again_even_with_chunks_held_ahead_of_a_gap(
    tmp_path: Path,
) -> None:
    """Chunks that came ahead of a gap kept a closed stream iterating, and iterating it again
    sent the request again: a second paid stream."""
    async with deployment(tmp_path, guide(), router=False, providers=[]) as dep:
        nc = dep.client.nc
        asked: list[str] = []

        async def answer(msg: Any) -> None:  # seq 0 then 2: 2 is held until 1 comes
            asked.append(msg.reply)
            await nc.publish(
                msg.reply, msgspec.json.encode(StreamChunk(task_id="t", seq=0, text="a "))
            )
            await nc.publish(
                msg.reply, msgspec.json.encode(StreamChunk(task_id="t", seq=2, text="c "))
            )

        await nc.subscribe("vapora.stream", cb=answer)
        stream = dep.client.stream(prompt="x", idle_timeout=1)
        assert await stream.__anext__() == "a "
        with anyio.move_on_after(0.3):  # seq 2 arrives and is held
            await stream.__anext__()
        await stream.aclose()
        assert [text async for text in stream] == []
        await nc.flush()
        assert len(asked) == 1


async def test_closing_a_stream_another_task_reads_ends_that_task_at_once(tmp_path: Path) -> None:
    """The reader waited out its idle timeout, then raised that the stream had sent nothing."""
    models = {"claude": "claude-opus-4-5-len-40-ttft-3000"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        stream = dep.client.stream(
            prompt="a b", task_type="CodeGeneration", quality="High", idle_timeout=30
        )
        read: list[str] = []

        async def reader() -> None:
            async for text in stream:
                read.append(text)
            read.append("ended")

        with anyio.fail_after(10):  # the idle timeout is 30 s: ended by the close, not by it
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.5)  # the reader waits for the first chunk (3 s away)
                await stream.aclose()
        assert read == ["ended"] and stream.error is None


async def test_a_stream_whose_caller_went_away_without_a_cancel_is_stopped_and_billed_what_came(
    tmp_path: Path,
) -> None:
    """NATS tells a publisher nothing when nobody reads a reply subject any more: a caller
    killed mid-stream (no cancel sent) had the provider generate to the end, billed for text
    nobody read. Now and then a chunk carries a reply subject, the server answers it with a
    503 when nobody listens, and the provider actor stops the stream."""
    import nats

    models = {"claude": "claude-opus-4-5-len-60-tps-10"}  # 6 s to stream in full
    async with deployment(tmp_path, guide(models=models)) as dep:
        caller = await nats.connect(dep.server.url, name="goes-away")
        inbox = caller.new_inbox()
        sub = await caller.subscribe(inbox)
        body = msgspec.json.encode(
            {"prompt": "a b c", "task_type": "CodeGeneration", "quality": "High", "task_id": "gone"}
        )
        await caller.publish("vapora.stream", body, reply=inbox)
        first = await sub.next_msg(timeout=10)
        assert b'"chunk"' in first.data
        await caller.close()  # killed, as far as vapora can tell: no cancel

        async def ended() -> list[Any]:
            events = await dep.events_of("gone")
            return [e for e in events if isinstance(e, CallFailed | CallSucceeded)]

        with anyio.fail_after(15):
            while not (done := await ended()):  # noqa: ASYNC110 - polling the event log
                await anyio.sleep(0.1)
        [call] = done
        assert isinstance(call, CallFailed), call
        assert call.error_code == "cancelled_by_caller" and call.usage.output_tokens < 60
        [spend] = [e for e in await dep.events_of("gone") if isinstance(e, SpendRecorded)]
        assert spend.output_tokens == call.usage.output_tokens and spend.cost_usd == call.cost_usd
