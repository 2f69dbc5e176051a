"""An input longer than a model's context window: the provider's own refusal (each dialect's
wording, from the simulator's ``ctx-<n>`` models) moves the task to the chain's next model, which
may have a larger window, unless ``[routing] context_overflow_fallback`` is off (providers.md
§3.5: "a context-length overflow may route to a larger-context model if policy allows")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from events.contract import Outcome
from events.log import CallFailed, CallSucceeded, FallbackTriggered, SpendRecorded
from tests.fault.provider_harness import config_text, deployment
from vapora.errors import ProviderRejected

pytestmark = pytest.mark.anyio

# 600 characters: 150 tokens as the simulator counts them (a token per four characters).
LONG = "lighthouse " * 54 + "keeper"


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


async def test_a_model_too_small_for_the_input_falls_back_to_the_next_model(
    tmp_path: Path,
) -> None:
    config = guide(models={"claude": "claude-opus-4-5-ctx-100"})
    async with deployment(tmp_path, config) as dep:
        result = await dep.client.complete(
            prompt=LONG, task_type="CodeGeneration", quality="High", task_id="long-1"
        )
        following = result.route.chain[1]
        assert result.route.chain[0] == "claude"
        assert result.provider == following
        assert [(a.provider, a.outcome, a.error_code) for a in result.attempts] == [
            ("claude", Outcome.ERROR, "context_overflow"),
            (following, Outcome.OK, None),
        ]
        assert result.attempts[0].cost_usd == 0
        events = await dep.events_of("long-1")
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        assert (failed.provider, failed.status) == ("claude", 400)
        assert "prompt is too long: 150 tokens > 100 maximum" in failed.message
        [fallback] = [e for e in events if isinstance(e, FallbackTriggered)]
        assert (fallback.from_provider, fallback.to_provider) == ("claude", following)
        assert fallback.reason.startswith("context_overflow: ")
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert spend.provider == following and spend.cost_usd == result.cost_usd

        # An input that fits goes to claude as before.
        short = await dep.client.complete(
            prompt="Write a sort", task_type="CodeGeneration", quality="High"
        )
        assert short.provider == "claude"


async def test_a_stream_falls_back_the_same_way(tmp_path: Path) -> None:
    config = guide(models={"claude": "claude-opus-4-5-ctx-100"})
    async with deployment(tmp_path, config) as dep:
        async with dep.client.stream(
            prompt=LONG, task_type="CodeGeneration", quality="High", task_id="long-s"
        ) as stream:
            text = "".join([chunk async for chunk in stream])
        end = stream.result
        assert end is not None and text
        assert end.provider == end.route.chain[1]
        assert [(a.provider, a.error_code) for a in end.attempts] == [
            ("claude", "context_overflow"),
            (end.provider, None),
        ]


async def test_a_provider_serving_a_model_that_refused_the_input_is_skipped(
    tmp_path: Path,
) -> None:
    # claude and gemini serve the same (simulated) model with a 100-token window: once one of
    # them refused the input, the other is not called; openai's window takes it.
    same = "shared-model-ctx-100"
    config = guide(models={"claude": same, "gemini": same})
    async with deployment(tmp_path, config) as dep:
        result = await dep.client.complete(
            prompt=LONG, task_type="CodeGeneration", quality="High", task_id="long-2"
        )
        first, second = (n for n in result.route.chain if n in ("claude", "gemini"))
        expected = {
            first: (Outcome.ERROR, "context_overflow"),
            second: (Outcome.SKIPPED, "context_overflow"),
            "openai": (Outcome.OK, None),
        }
        tried = result.route.chain[: result.route.chain.index("openai") + 1]
        assert [(a.provider, a.outcome, a.error_code) for a in result.attempts] == [
            (name, *expected[name]) for name in tried
        ]
        assert second in tried  # the skip was on the way
        events = await dep.events_of("long-2")
        assert [e.provider for e in events if isinstance(e, CallFailed)] == [first]
        assert [e.provider for e in events if isinstance(e, CallSucceeded)] == ["openai"]
        kind = {"claude": "anthropic", "gemini": "gemini"}[second]
        assert not [r for r in dep.sim.requests if r.provider == kind]


async def test_an_input_longer_than_every_window_is_the_callers_502(tmp_path: Path) -> None:
    models = {
        "claude": "claude-opus-4-5-ctx-100",
        "openai": "gpt-4-ctx-100",
        "gemini": "gemini-2.0-flash-ctx-100",
        "ollama": "llama2-ctx-100",
    }
    async with deployment(tmp_path, guide(models=models)) as dep:
        with pytest.raises(ProviderRejected) as raised:
            await dep.client.complete(
                prompt=LONG, task_type="CodeGeneration", quality="High", task_id="long-3"
            )
        message = str(raised.value)
        assert "longer than every model's context window" in message
        events = await dep.events_of("long-3")
        failed = [e for e in events if isinstance(e, CallFailed)]
        # The chain, with the free model appended as the last resort: each refused it.
        assert sorted(e.provider for e in failed) == ["claude", "gemini", "ollama", "openai"]
        assert all(e.status == 400 for e in failed)
        assert not [e for e in events if isinstance(e, SpendRecorded) and e.cost_usd]


async def test_with_the_policy_off_an_overflow_is_returned_at_once(tmp_path: Path) -> None:
    config = guide(
        models={"claude": "claude-opus-4-5-ctx-100"},
        extra="[routing]\ncontext_overflow_fallback = false\n",
    )
    async with deployment(tmp_path, config) as dep:
        with pytest.raises(ProviderRejected, match="prompt is too long"):
            await dep.client.complete(
                prompt=LONG, task_type="CodeGeneration", quality="High", task_id="long-4"
            )
        events = await dep.events_of("long-4")
        assert not [e for e in events if isinstance(e, FallbackTriggered)]
        assert [e.provider for e in events if isinstance(e, CallFailed)] == ["claude"]
