"""The routing pipeline end to end: a real nats-server, the provider simulator over HTTP, provider
actors and the router, called through ``vapora.Client`` (DESIGN §3-§4, issue 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import anyio
import msgspec
import pytest

import vapora
from actors.router import RouterActor
from actors.server import EmbeddedNats
from events.codec import decode
from events.contract import CompletionResult, ErrorReply, Outcome
from events.log import CallFailed, CallSucceeded, FallbackTriggered, RouteDecided, SpendRecorded
from tests.fault.provider_harness import (
    KEYS,
    config_text,
    deployment,
    until,
    wait_until_served,
)
from tests.providers.conftest import stub
from vapora.errors import (
    BudgetExceeded,
    InvalidRequest,
    NoProviderAvailable,
    ProviderRejected,
    UnknownProvider,
    UnknownTaskType,
)
from vapora.pricing import cost

pytestmark = pytest.mark.anyio


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


async def test_the_guides_example_goes_to_claude_and_every_event_is_in_the_log(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide()) as dep:
        result = await dep.client.complete(
            prompt="Write a function that reverses a list",
            task_type="CodeGeneration",
            quality="High",
            budget_cents=500,
        )
        assert result.provider == "claude"
        assert result.model.startswith("claude-opus-4-5")
        assert result.text
        assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
        price = dep.runtime.config.provider("claude").price  # type: ignore[union-attr]
        assert result.cost_usd == cost(result.usage, price) > 0
        assert [(a.provider, a.outcome) for a in result.attempts] == [("claude", Outcome.OK)]
        assert result.route.chain[0] == "claude"
        assert "claude" in result.route.reason
        events = await dep.events_of(result.task_id)
        kinds = [type(e) for e in events]
        assert kinds[0] is RouteDecided
        assert {CallSucceeded, SpendRecorded} <= set(kinds)
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert spend.cost_usd == result.cost_usd and spend.price == price
        # The simulator answers 401 without a key, so ours was sent; no event carries it.
        for event in await dep.events():
            text = repr(event)
            assert all(secret not in text for secret in KEYS.values())


async def test_an_override_goes_where_it_says(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide()) as dep:
        result = await dep.client.complete(
            prompt="hello", task_type="CodeGeneration", quality="High", provider="gemini"
        )
        assert result.provider == "gemini"
        assert result.route.chain == ["gemini"]
        assert "manual override" in result.route.reason


async def test_a_provider_without_its_api_key_is_skipped_and_the_decision_says_why(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in KEYS.items() if k != "ANTHROPIC_API_KEY"}
    async with deployment(tmp_path, guide(), env=env) as dep:
        result = await dep.client.complete(
            prompt="hello", task_type="CodeGeneration", quality="High"
        )
        assert result.provider != "claude"
        assert "claude" not in result.route.chain
        [claude] = [c for c in result.route.candidates if c.provider == "claude"]
        assert not claude.kept
        assert any(
            not v.passed and "ANTHROPIC_API_KEY is not set" in v.reason for v in claude.verdicts
        )


async def test_a_router_without_the_keys_routes_to_providers_whose_actors_have_them(
    tmp_path: Path,
) -> None:
    """The API keys are the provider actors' (compose gives them to those containers only); the
    router judged each provider by its own environment and dropped every paid one as `... is
    not set`. It now takes a missing key from the provider actor's health report only."""
    async with deployment(tmp_path, guide(), router=False) as dep:
        keyless = dataclasses.replace(dep.runtime, env={})
        router = RouterActor(keyless)
        async with anyio.create_task_group() as tg:
            await tg.start(router.run)
            await wait_until_served(dep.client.nc, "vapora.complete")
            result = await dep.client.complete(
                prompt="hello", task_type="CodeGeneration", quality="High"
            )
            router.stop()
    assert result.provider == "claude", result.route.reason
    assert "is not set" not in result.route.reason


async def test_unknown_provider_and_task_type_get_404_and_malformed_requests_400(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide()) as dep:
        with pytest.raises(UnknownProvider, match="nope"):
            await dep.client.complete(prompt="hi", provider="nope")
        with pytest.raises(UnknownTaskType, match="SecurityAnalysis"):
            await dep.client.complete(prompt="hi", task_type="SecurityAnalysis")
        # A task type outside the seven is a 404 too (DESIGN §3; it was a 400), on both
        # subjects, naming it and the task types there are; so says vapora.Client before sending.
        for subject in ("vapora.complete", "vapora.stream"):
            body = b'{"prompt": "hi", "task_type": "Astrology"}'
            reply = await dep.client.nc.request(subject, body, timeout=5)
            assert (reply.headers or {})["Nats-Service-Error-Code"] == "404"
            answer = reply.data.decode()
            assert '"unknown_task_type"' in answer and "'Astrology'" in answer
            assert "CodeGeneration" in answer
        with pytest.raises(UnknownTaskType, match="Astrology"):
            await dep.client.complete(prompt="hi", task_type="Astrology")
        for body, named in [
            (b"{not json", "malformed JSON"),
            (b'{"prompt": "hi", "colour": "blue"}', "colour"),
            (b'{"prompt": "hi", "quality": "Superb"}', "quality"),
            (b'{"task_type": "CodeGeneration"}', "prompt"),
            (b'{"prompt": "hi", "task_type": 7}', "task_type"),  # not even a string: a 400
        ]:
            reply = await dep.client.nc.request("vapora.complete", body, timeout=5)
            assert (reply.headers or {})["Nats-Service-Error-Code"] == "400"
            assert named in reply.data.decode()
        with pytest.raises(InvalidRequest):
            await dep.client.complete(prompt="hi", quality="Superb")
        # A task scope it does not know was taken as none, without a word.
        body = b'{"prompt": "hi", "task_id": "t-scope"}'
        for subject in ("vapora.complete", "vapora.stream"):
            for scope in ("requests", "x" * 300):
                headers = {"Vapora-Task-Scope": scope}
                reply = await dep.client.nc.request(subject, body, timeout=5, headers=headers)
                assert (reply.headers or {})["Nats-Service-Error-Code"] == "400"
                answer = reply.data.decode()
                assert "Vapora-Task-Scope" in answer and scope[:40] in answer
                assert "x" * 41 not in answer
                assert ('"type":"error"' in answer) == (subject == "vapora.stream")
        assert not await dep.events_of("t-scope")
        # The router serves on.
        assert (await dep.client.complete(prompt="still here")).text


async def test_claude_overloaded_falls_back_to_the_next_in_the_chain_and_the_log_shows_both(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide(models={"claude": "claude-opus-4-5-error-529"})) as dep:
        result = await dep.client.complete(
            prompt="Write a sort", task_type="CodeGeneration", quality="High"
        )
        assert result.route.chain[0] == "claude"
        following = result.route.chain[1]
        assert result.provider == following
        assert [(a.provider, a.outcome) for a in result.attempts] == [
            ("claude", Outcome.ERROR),
            (following, Outcome.OK),
        ]
        assert result.attempts[0].error_code == "transient"
        events = await dep.events_of(result.task_id)
        kinds = [type(e).__name__ for e in events]
        for kind in ("RouteDecided", "CallFailed", "FallbackTriggered", "CallSucceeded"):
            assert kind in kinds
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        assert failed.provider == "claude" and failed.status == 529
        [fallback] = [e for e in events if isinstance(e, FallbackTriggered)]
        assert (fallback.from_provider, fallback.to_provider) == ("claude", following)
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert spend.provider == following and spend.cost_usd == result.cost_usd


async def test_an_answer_cut_after_its_200_is_recorded_at_its_bound_and_falls_back(
    tmp_path: Path,
) -> None:
    """Claude answered 200 and the connection broke mid-body: the provider made (and bills) the
    whole answer, whose usage was in the part not received. The attempt is recorded at its
    upper bound (before: $0, its hold released), and the task falls back, paying the next."""
    claude = {"claude": "claude-opus-4-5-cut-5"}
    async with deployment(tmp_path, guide(models=claude)) as dep:
        result = await dep.client.complete(
            prompt="Write a sort", task_type="CodeGeneration", quality="High", max_tokens=64
        )
        following = result.route.chain[1]
        assert result.provider == following
        assert [(a.provider, a.outcome) for a in result.attempts] == [
            ("claude", Outcome.ERROR),
            (following, Outcome.OK),
        ]
        events = await dep.events_of(result.task_id)
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        assert (failed.provider, failed.error_code) == ("claude", "answer_cut")
        assert failed.usage.output_tokens == 64 and failed.usage.input_tokens > 0
        price = dep.runtime.config.provider("claude").price  # type: ignore[union-attr]
        bound = cost(failed.usage, price)
        spends = {e.provider: e.cost_usd for e in events if isinstance(e, SpendRecorded)}
        assert spends == {"claude": bound, following: result.cost_usd}
        assert bound > 0 and failed.cost_usd == bound == result.attempts[0].cost_usd


async def test_a_long_answer_is_delivered_and_one_too_long_for_nats_is_a_502_paid_once(
    tmp_path: Path,
) -> None:
    # A server carrying 2 MB a message. An answer of 1.5 MB was "unreadable" to the router (a
    # request's 1 MiB limit), and one over 2 MB raised in the provider actor and was answered
    # by nobody: either way the task fell back, paying each next provider for the same answer.
    models = {"claude": "claude-opus-4-5-len-500000", "openai": "gpt-4-len-300000"}
    async with deployment(
        tmp_path, guide(models=models), server_config="max_payload: 2MB\n"
    ) as dep:
        result = await dep.client.complete(prompt="abcd", provider="openai", max_tokens=300_000)
        assert len(result.text) == 300_000 * 5 - 1 and result.provider == "openai"
        with pytest.raises(ProviderRejected, match="more than the NATS server carries") as raised:
            await dep.client.complete(
                prompt="abcd",
                task_type="CodeGeneration",
                quality="High",
                task_id="t-long",
                max_tokens=500_000,
            )
        assert "vapora.stream" in str(raised.value)
        events = await dep.events_of("t-long")
        assert not [e for e in events if isinstance(e, FallbackTriggered)]
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert spend.provider == "claude" and spend.output_tokens == 500_000
        # The error says what the call cost, as the contract says (its body had neither).
        error = raised.value
        assert (error.task_id, error.task_cost_usd) == ("t-long", spend.cost_usd)
        assert error.task_usage is not None and error.task_usage.output_tokens == 500_000


async def test_claude_hanging_past_its_timeout_falls_back(tmp_path: Path) -> None:
    config = guide(models={"claude": "claude-opus-4-5-hang"}, timeouts={"claude": 300})
    async with deployment(tmp_path, config) as dep:
        result = await dep.client.complete(
            prompt="Write a sort", task_type="CodeGeneration", quality="High"
        )
        assert result.provider == result.route.chain[1]
        assert result.attempts[0].outcome is Outcome.TIMEOUT
        assert result.attempts[0].provider == "claude"


async def test_a_400_from_the_provider_is_returned_without_fallback(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide(models={"claude": "claude-opus-4-5-error-400"})) as dep:
        with pytest.raises(ProviderRejected, match="400"):
            await dep.client.complete(
                prompt="bad", task_type="CodeGeneration", quality="High", task_id="t-400"
            )
        events = await dep.events_of("t-400")
        assert not [e for e in events if isinstance(e, FallbackTriggered)]
        assert not [e for e in events if isinstance(e, CallSucceeded)]
        assert [e.provider for e in events if isinstance(e, CallFailed)] == ["claude"]


async def test_every_provider_failing_gives_503_listing_every_attempt(tmp_path: Path) -> None:
    models = {
        "claude": "claude-opus-4-5-error-529",
        "openai": "gpt-4-error-503",
        "gemini": "gemini-2.0-flash-error-500",
        "ollama": "llama2-error-502",
    }
    async with deployment(tmp_path, guide(models=models)) as dep:
        with pytest.raises(NoProviderAvailable) as raised:
            await dep.client.complete(
                prompt="x", task_type="CodeGeneration", quality="High", task_id="doomed"
            )
        message = str(raised.value)
        for name in ("claude", "openai", "gemini", "ollama"):
            assert name in message
        events = await dep.events_of("doomed")
        assert len([e for e in events if isinstance(e, CallFailed)]) == 4
        fallbacks = [e for e in events if isinstance(e, FallbackTriggered)]
        assert len(fallbacks) == 4 and fallbacks[-1].to_provider is None
        # The answer names the task, even one whose id vapora made up (a service that did not
        # give one could not find the failed task's events), for services not using vapora.Client.
        reply = await dep.client.nc.request("vapora.complete", b'{"prompt": "x"}', timeout=10)
        body = decode(reply.data, ErrorReply)
        assert body.error.code == "no_provider_available" and body.task_id
        assert body.task_id in body.error.message and await dep.events_of(body.task_id)
        assert raised.value.task_id == "doomed"


async def test_500_concurrent_paid_requests_never_overspend_the_daily_limit(
    tmp_path: Path,
) -> None:
    """With the real budget keeper: each paid attempt reserves its upper bound first, so the
    recorded spend stays within the limit; the rest go to the zero-cost provider or get 402."""
    models = {"claude": "claude-opus-4-5-len-100", "openai": "gpt-4-len-100"}
    # One claude call reserves (prompt estimate + 100 output tokens) x $0.015/1k ~ $0.0017;
    # 8.5 cents holds about fifty of them.
    budget = "[budget]\ndaily_limit_cents = 8.5\n"
    async with deployment(tmp_path, guide(models=models, budget=budget), keeper=True) as dep:
        results, refused = [], []

        async def one(i: int) -> None:
            try:
                results.append(
                    await dep.client.complete(
                        prompt=f"write function number {i}",
                        task_type="CodeGeneration",
                        quality="High",
                        max_tokens=100,
                    )
                )
            except BudgetExceeded as error:
                refused.append(error)

        with anyio.fail_after(80):
            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(one, i)
        assert len(results) + len(refused) == 500
        spends = [e for e in await dep.events() if isinstance(e, SpendRecorded)]
        paid = sum((e.cost_usd for e in spends), Decimal(0))
        assert paid <= Decimal("0.085")
        paid_calls = [r for r in results if r.provider != "ollama"]
        # Settled spend frees what was reserved, so more calls are paid than fit as holds; how
        # many depends on which paid model served them and how the calls interleaved: never
        # more than the limit buys at the cheapest price seen.
        assert len(paid_calls) >= 20, len(paid_calls)
        cheapest = min(r.cost_usd for r in paid_calls)
        assert len(paid_calls) <= Decimal("0.085") / cheapest, (len(paid_calls), cheapest)
        free = [r for r in results if r.provider == "ollama"]
        assert free or refused  # the limit was reached: the rest went free or were refused
        assert len(paid_calls) + len(free) + len(refused) == 500
        assert sum((r.cost_usd for r in results), Decimal(0)) == paid


async def test_a_latency_requirement_bounds_each_attempt_and_a_slow_provider_falls_back(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide(models={"claude": "claude-opus-4-5-slow-3000"})) as dep:
        result = await dep.client.complete(
            prompt="quick", task_type="CodeGeneration", quality="High", latency_required_ms=300
        )
        assert result.attempts[0].provider == "claude"
        assert result.attempts[0].outcome is Outcome.TIMEOUT
        assert result.attempts[0].latency_ms < 2500
        assert result.provider != "claude"


async def test_a_completion_has_no_time_limit_but_its_attempts(tmp_path: Path) -> None:
    """``vapora.complete`` answered 504 after the service's default 120 s while its attempt went
    on and was billed: a provider with a ``timeout_ms`` above it, or a chain longer than it,
    could never finish, and the caller paid for text it never got. Each attempt's limit bounds
    a completion, as a stream's."""
    async with deployment(tmp_path, guide()) as dep:
        assert dep.router is not None
        limits = {e.name: e.timeout for e in dep.router.service.endpoints}
    assert limits == {"complete": None, "stream": None}


async def test_a_provider_actors_error_replies_are_counted_in_its_service_stats(
    tmp_path: Path,
) -> None:
    """``$SRV.STATS`` measures every actor (DESIGN §2): a provider actor's error replies, which
    it publishes itself with its own headers, were never counted (``num_errors`` 0)."""
    import json

    models = {"claude": "claude-opus-4-5-error-503"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        for _ in range(3):
            await dep.client.complete(prompt="hi", task_type="CodeGeneration", quality="High")
        reply = await dep.nc.request("$SRV.STATS.provider-claude", b"", timeout=5)
    [endpoint] = json.loads(reply.data)["endpoints"]
    assert (endpoint["num_requests"], endpoint["num_errors"]) == (3, 3)
    assert endpoint["last_error"].startswith("502: claude: HTTP 503")


async def test_a_caller_gets_its_answer_across_a_short_restart_of_the_nats_server(
    tmp_path: Path,
) -> None:
    # vapora.Client.connect kept nats-py's 2 s reconnect wait: the router answered while the
    # caller was still away, core NATS dropped the answer, and the caller waited out its whole
    # timeout for a call that was made and billed.
    config = guide(models={"openai": "gpt-4-slow-1500"})
    answers: list[CompletionResult] = []
    servers: list[EmbeddedNats] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(lambda: servers[0].stop())  # once everyone left it
        dep = await stack.enter_async_context(deployment(tmp_path, config, providers=["openai"]))
        restarted = EmbeddedNats(dep.server.data_dir, port=dep.server.port)
        servers.append(restarted)
        client = await stack.enter_async_context(
            vapora.Client.connect(dep.server.url, timeout_s=20)
        )

        async def ask() -> None:
            answers.append(await client.complete(prompt="hi", provider="openai"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await anyio.sleep(0.3)  # the call is with the provider
            dep.server.kill()
            await anyio.sleep(0.2)
            await restarted.start()
        # The harness's own caller (nats-py's 2 s wait) back too, before it is closed.
        await until(lambda: dep.client.nc.is_connected, within_s=10)
    [answer] = answers
    assert answer.provider == "openai" and answer.text == "hi"


_CODE = 'def check(pw):\n    if pw == "hunter2":\n        return True\n    return False\n'
_RUSSIAN = "Сведи квартальные цифры по счёту Занзибар 😀"  # (an emoji: a surrogate pair in JSON)
_LATEX = "Solve \\frac{Zanzibar}{b} + \\sqrt{x^2} = \\alpha for x"  # (its own backslashes)


@pytest.mark.parametrize(
    ("prompt", "escaped"),
    [
        ("Summarise the quarterly numbers for the Zanzibar account", False),
        # Quoted as JSON (a gateway's, a pydantic-style error's `input_value=`): code's short
        # lines (`\n`, `\"` between them) and a non-Latin text (all `\u...`) matched no run
        # of the prompt, and went into the log whole (a review).
        (_CODE, True),
        (_RUSSIAN, True),
        (_LATEX, True),
    ],
    ids=["plain", "code-json", "russian-json", "latex-json"],
)
async def test_a_provider_error_quoting_the_prompt_keeps_it_out_of_the_log_and_the_reply(
    tmp_path: Path, prompt: str, escaped: bool
) -> None:
    # A provider that echoes the request in its 400 (as gateways and some APIs do): the prompt
    # went into call_failed.message in the log (which cannot be deleted), the router's log
    # line, $SRV.STATS and the caller's error, though prompts stay out unless opted in.
    quoted = json.dumps(prompt) if escaped else prompt
    error = {"type": "invalid_request_error", "message": f"messages.0.content: invalid: {quoted}"}
    body = json.dumps({"type": "error", "error": error}).encode()
    answer = (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    async with stub(answer) as port:

        def with_stub(base_url: str) -> str:  # claude at the stub, the others as they were
            text = config_text(base_url)
            claude = text.index('name = "claude"')
            url = text.index(f'base_url = "{base_url}"', claude)
            stubbed = f'base_url = "http://127.0.0.1:{port}"'
            return text[:url] + stubbed + text[url + len(f'base_url = "{base_url}"') :]

        async with deployment(tmp_path, with_stub, providers=["claude"]) as dep:
            with pytest.raises(ProviderRejected) as refused:
                await dep.client.complete(prompt=prompt, provider="claude", task_id="t-echo")
            events = await dep.events_of("t-echo")
    [failed] = [e for e in events if isinstance(e, CallFailed)]
    assert failed.status == 400 and failed.error_code == "invalid_request_error"
    for said in (failed.message, str(refused.value)):
        assert "quoted the request's text" in said
        for canary in ("Zanzibar", "hunter2", "Занзибар", "\\u0417\\u0430\\u043d"):
            assert canary not in said


async def test_a_huge_bad_request_on_a_1_mb_server_gets_a_short_400_and_vapora_serves_on(
    tmp_path: Path,
) -> None:
    # nats-server's own default max_payload (1 MB). The 400 quoted the 600 KB unknown field's
    # name twice (its header and its body): past 1 MB, the server closed the router's
    # connection, and nothing was served again, the process still running.
    async with deployment(tmp_path, guide(), server_config="max_payload: 1048576\n") as dep:
        for body in (
            b'{"prompt": "hi", "' + b"f" * 600_000 + b'": 1}',
            b'{"prompt": "hi", "quality": "' + b"Q" * 600_000 + b'"}',
            b'{"prompt": "hi", "provider": "' + b"p" * 600_000 + b'"}',
        ):
            reply = await dep.client.nc.request("vapora.complete", body, timeout=10)
            headers = reply.headers or {}
            assert headers["Nats-Service-Error-Code"] in ("400", "404")
            # At most the contract's 2,000 characters, the note of the cut included (a review:
            # 2,028 with the note after the 2,000).
            message = msgspec.json.decode(reply.data)["error"]["message"]
            assert len(headers["Nats-Service-Error"]) == len(message) == 2_000
            assert message.endswith(" characters in all)") and len(reply.data) < 2_300
        # $SRV.STATS carries each endpoint's last error: cut too (whole, it was past 1 MB).
        stats = await dep.client.nc.request("$SRV.STATS.router", b"", timeout=10)
        assert b" characters in all)" in stats.data and len(stats.data) < 20_000
        assert (await dep.client.complete(prompt="still here")).text


async def test_counts_vapora_estimated_are_flagged_in_the_events_and_stated_ones_are_not(
    tmp_path: Path,
) -> None:
    # Ollama without its counts (`nocounts`): vapora estimates them from above. The catalogue
    # said `usage_estimated` then flags them; no event had such a field.
    models = {"ollama": "llama2-nocounts"}
    async with deployment(tmp_path, guide(models=models)) as dep:
        guessed = await dep.client.complete(prompt="hi", provider="ollama", task_id="t-guess")
        stated = await dep.client.complete(prompt="hi", provider="claude", task_id="t-stated")
        assert guessed.text and stated.text
        # The answer says so too (a review: only the events did), a stream's end as well.
        assert guessed.usage_estimated is True and stated.usage_estimated is msgspec.UNSET
        ends = []
        for provider in ("ollama", "claude"):
            async with dep.client.stream(prompt="hi", provider=provider) as stream:
                async for _ in stream:
                    pass
            ends.append(stream.result)
        assert [end.usage_estimated for end in ends] == [True, msgspec.UNSET]
        raw = await dep.client.nc.request(
            "vapora.complete", b'{"prompt": "hi", "provider": "claude"}', timeout=10
        )
        assert b"usage_estimated" not in raw.data
        for task, flag in (("t-guess", True), ("t-stated", msgspec.UNSET)):
            events = await dep.events_of(task)
            [call] = [e for e in events if isinstance(e, CallSucceeded)]
            [spend] = [e for e in events if isinstance(e, SpendRecorded)]
            assert call.usage_estimated == spend.usage_estimated == flag, task
            assert (b'"usage_estimated"' in msgspec.json.encode(spend)) == (flag is True)


@pytest.mark.parametrize(
    "stated",
    [
        "<script>alert(1)</script>\n",
        "gpt-4\nBy model: forged 0.00",
        "m" * 1_500_000,
        7,
        "gpt-4o-2024-08-06",  # a model's name: kept
    ],
)
async def test_a_model_name_the_provider_states_that_is_not_one_is_not_recorded(
    tmp_path: Path, stated: object
) -> None:
    """The answering model a provider states goes into events, spans, metric labels and the
    text report: markup, a newline that forges a report line, 1.5 MB were stored whole (a
    review). The model asked for is recorded instead; a model's name stays as stated."""
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": stated,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).encode()
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    async with stub(answer) as port:

        def with_stub(base_url: str) -> str:
            text = config_text(base_url)
            simulated = f'base_url = "{base_url}/v1"'  # (the openai kind's)
            url = text.index(simulated, text.index('name = "openai"'))
            stubbed = f'base_url = "http://127.0.0.1:{port}/v1"'
            return text[:url] + stubbed + text[url + len(simulated) :]

        async with deployment(tmp_path, with_stub, providers=["openai"]) as dep:
            answered = await dep.client.complete(prompt="hi", provider="openai", task_id="t-m")
            events = await dep.events_of("t-m")
    asked = dep.runtime.config.provider("openai").model  # type: ignore[union-attr]
    [call] = [e for e in events if isinstance(e, CallSucceeded)]
    [spend] = [e for e in events if isinstance(e, SpendRecorded)]
    kept = stated if stated == "gpt-4o-2024-08-06" else asked
    assert answered.model == call.model == spend.model == kept
