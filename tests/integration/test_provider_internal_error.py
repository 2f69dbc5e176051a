"""A provider actor that fails inside vapora mid-call (a 500 `internal`, not a provider's error):
what the provider billed is unknown, and so, for a stream, is whether its chunks reached the
caller. The router took it as a plain failure: it released the attempt's hold and fell back,
and a stream went on with the next provider's text after the first one's chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from events.contract import StreamChunk, StreamError, StreamMessage
from events.log import BudgetReleased, BudgetReserved, CallFailed, CallSucceeded, FallbackTriggered
from tests.fault.provider_harness import config_text, deployment
from vapora.providers.anthropic import AnthropicClient

pytestmark = pytest.mark.anyio

BUDGET = "[budget]\ndaily_limit_cents = 100000\nlease_cents = 0\n"  # reserve per attempt


# A bug of ours answers 500; a TimeoutError escaping the handler answers 504: both mid-call.
BUGS = [RuntimeError, TimeoutError]


def _failing_after(
    texts: int, monkeypatch: pytest.MonkeyPatch, bug: type[Exception] = RuntimeError
) -> None:
    """Anthropic's stream parser raises a bug of ours after ``texts`` text frames."""
    original = AnthropicClient._on_frame
    seen = {"texts": 0}

    def on_frame(self: AnthropicClient, frame: Any, turn: Any) -> str | None:
        text = original(self, frame, turn)
        if text:
            seen["texts"] += 1
            if seen["texts"] > texts:
                raise bug("a bug of ours")
        return text

    monkeypatch.setattr(AnthropicClient, "_on_frame", on_frame)


def config(base_url: str) -> str:
    return config_text(base_url, models={"claude": "claude-opus-4-5-len-8-tps-50"}, budget=BUDGET)


@pytest.mark.parametrize("bug", BUGS)
async def test_a_stream_whose_provider_actor_failed_inside_vapora_does_not_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    _failing_after(2, monkeypatch, bug)
    decoder = msgspec.json.Decoder(StreamMessage)
    async with deployment(tmp_path, config, keeper=True) as dep:
        inbox = dep.nc.new_inbox()
        sub = await dep.nc.subscribe(inbox)
        request = {"prompt": "one two three", "task_type": "CodeGeneration", "quality": "High"}
        body = msgspec.json.encode({**request, "task_id": "internal-s"})
        await dep.nc.publish("vapora.stream", body, reply=inbox)
        messages: list[Any] = []
        while not messages or isinstance(messages[-1], StreamChunk):
            messages.append(decoder.decode((await sub.next_msg(timeout=15)).data))
        events = await dep.events_of("internal-s")
    chunks = [m for m in messages if isinstance(m, StreamChunk)]
    assert [c.seq for c in chunks] == [0, 1]
    assert isinstance(messages[-1], StreamError)  # not another provider's text after these
    assert not [e for e in events if isinstance(e, FallbackTriggered)]
    assert not [e for e in events if isinstance(e, CallSucceeded)]
    [failed] = [e for e in events if isinstance(e, CallFailed)]
    assert (failed.provider, failed.error_class) == ("claude", "internal")
    [hold] = [e.reservation_id for e in events if isinstance(e, BudgetReserved)]
    assert hold not in {e.reservation_id for e in events if isinstance(e, BudgetReleased)}


@pytest.mark.parametrize("bug", BUGS)
async def test_a_call_whose_provider_actor_failed_inside_vapora_keeps_its_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    def broken(self: AnthropicClient, data: Any, turn: Any) -> None:
        raise bug("a bug of ours")

    monkeypatch.setattr(AnthropicClient, "_parse", broken)
    async with deployment(tmp_path, config, keeper=True) as dep:
        done = await dep.client.complete(
            prompt="hello", task_type="CodeGeneration", quality="High", task_id="internal-c"
        )
        events = await dep.events_of("internal-c")
        anthropic_calls = [r for r in dep.sim.requests if r.provider == "anthropic"]
    assert done.provider != "claude"  # a whole answer may still fall back
    assert (done.attempts[0].provider, done.attempts[0].error_code) == ("claude", "internal")
    assert len(anthropic_calls) == 1  # and is not sent to the same provider again
    claude_hold = [
        e.reservation_id for e in events if isinstance(e, BudgetReserved) and e.provider == "claude"
    ]
    released = {e.reservation_id for e in events if isinstance(e, BudgetReleased)}
    assert claude_hold and claude_hold[0] not in released  # what it billed is unknown
