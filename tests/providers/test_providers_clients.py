"""Each client against the simulator over real HTTP: text, usage, cost, streams, timing, health."""

from __future__ import annotations

import socket
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import pytest

from events.contract import ChatMessage, ProviderCall, TaskType, Usage
from tests.providers.conftest import SECRET, ClientFactory, price_of, stub
from vapora.errors import ConfigError, InvalidRequest, ProviderConfigError, ProviderUnavailable
from vapora.providers import (
    DEFAULT_BASE_URLS,
    DEFAULT_MAX_TOKENS,
    ProviderRequest,
    input_token_bound,
    make_client,
)
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio

KINDS = ["anthropic", "openai", "gemini", "ollama"]
PROMPT = "one two three four five six"  # 27 characters: the simulator bills ceil(27/4) = 7
# Usage for PROMPT with 8 cached tokens, in our semantics (input includes the cache).
USAGE = {
    "anthropic": Usage(input_tokens=15, output_tokens=6, cache_read_tokens=8),
    "openai": Usage(input_tokens=15, output_tokens=6, cache_read_tokens=8),
    "gemini": Usage(input_tokens=15, output_tokens=6, cache_read_tokens=8),
    "ollama": Usage(input_tokens=7, output_tokens=6),  # Ollama reports no cache
}
# Hand-computed: 7 uncached x input + 8 cached x cache read + 6 x output, per million.
COST = {
    "anthropic": Decimal("0.0001134"),  # 7*3 + 8*0.3 + 6*15 = 113.4
    "openai": Decimal("0.0000875"),  # 7*2.5 + 8*1.25 + 6*10 = 87.5
    "gemini": Decimal("0.00001734"),  # 7*0.3 + 8*0.03 + 6*2.5 = 17.34
    "ollama": Decimal(0),
}


async def _answer(client: Any, request: ProviderRequest, streaming: bool) -> Any:
    """``client``'s completion of ``request``, streamed (read to the end) or not."""
    if not streaming:
        return await client.complete(request)
    async with client.stream(request) as stream:
        _ = [text async for text in stream]
    return stream.completion


@pytest.mark.parametrize("kind", KINDS)
async def test_complete_returns_text_usage_and_cost(kind: str, client_for: ClientFactory) -> None:
    client = client_for(kind, "cached-8")

    done = await client.complete(ProviderRequest(prompt=PROMPT, max_tokens=100))

    assert done.text == PROMPT
    assert done.finish_reason == "stop"
    assert done.usage == USAGE[kind]
    assert done.cost_usd == COST[kind]
    assert done.usage_estimated is False
    assert done.provider == f"{kind}-sim"
    assert (done.response_id is None) == (kind == "ollama")  # Ollama answers carry no id
    assert done.latency_ms > 0 and done.first_token_ms is None


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_yields_chunks_then_the_same_usage_and_cost(
    kind: str, client_for: ClientFactory
) -> None:
    client = client_for(kind, "cached-8")

    chunks = []
    async with client.stream(ProviderRequest(prompt=PROMPT, max_tokens=100)) as stream:
        async for text in stream:
            chunks.append(text)
    done = stream.completion

    assert chunks == ["one", " two", " three", " four", " five", " six"]
    assert done is not None
    assert done.text == PROMPT and done.chunks == 6
    assert done.finish_reason == "stop"
    assert done.usage == USAGE[kind]
    assert done.cost_usd == COST[kind]
    assert done.first_token_ms is not None and done.first_token_ms <= done.latency_ms


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("streaming", [False, True])
async def test_max_tokens_truncates_with_finish_reason_length(
    kind: str, streaming: bool, client_for: ClientFactory
) -> None:
    done = await _answer(client_for(kind), ProviderRequest(prompt=PROMPT, max_tokens=3), streaming)

    assert done is not None
    assert done.text == "one two three"
    assert done.finish_reason == "length"
    assert done.usage.output_tokens == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_messages_with_system_reach_the_model(kind: str, client_for: ClientFactory) -> None:
    client = client_for(kind)
    request = ProviderRequest(
        messages=[
            ChatMessage(role="user", content="first question"),
            ChatMessage(role="assistant", content="first answer"),
            ChatMessage(role="user", content="alpha beta"),
        ],
        system="be brief",
    )

    done = await client.complete(request)

    assert done.text == "alpha beta"  # the simulator echoes the last user turn
    # 8 + 14 + 12 + 10 = 44 characters of input, system included: ceil(44/4) = 11 tokens
    assert done.usage.input_tokens == 11


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("streaming", [False, True])
async def test_a_conversation_of_system_messages_only_is_answered(
    kind: str, streaming: bool, client_for: ClientFactory, sim: Simulator
) -> None:
    """OpenAI and Ollama answer a conversation of system messages alone; Anthropic and Gemini
    refuse one with no turn (400: "at least one message is required", "contents is not
    specified"), so the provider a task was routed to decided whether it failed. Their
    clients send the system text as the one user turn."""
    request = ProviderRequest(
        messages=[ChatMessage(role="system", content="alpha beta")], system="gamma"
    )
    done = await _answer(client_for(kind), request, streaming)

    assert done is not None and done.text
    body = msgspec.json.decode(sim.app.requests[-1].body)
    if kind == "anthropic":
        assert body["messages"] == [{"role": "user", "content": "gamma\n\nalpha beta"}]
        assert "system" not in body
    elif kind == "gemini":
        assert body["contents"] == [{"role": "user", "parts": [{"text": "gamma\n\nalpha beta"}]}]
        assert "systemInstruction" not in body
    if kind in ("anthropic", "gemini"):
        assert done.text == "gamma alpha beta"  # the simulator echoes the user turn's words


@pytest.mark.parametrize(("kind", "suffix"), [("openai", "nousage"), ("ollama", "nocounts")])
async def test_unreported_usage_is_estimated_and_flagged(
    kind: str, suffix: str, client_for: ClientFactory
) -> None:
    client = client_for(kind, suffix)
    request = ProviderRequest(prompt=PROMPT, max_tokens=100)

    async with client.stream(request) as stream:
        _ = [text async for text in stream]
    done = stream.completion

    assert done is not None and done.text == PROMPT
    assert done.usage_estimated is True
    # Missing counts are bounded, never under-counted: a token per UTF-8 byte (and the
    # template's tokens for the input), at least what the simulator would have reported.
    assert done.usage.input_tokens == input_token_bound(request) >= 7
    assert done.usage.output_tokens == len(PROMPT.encode()) == 27
    # But never past the output limit the provider was sent (27 bytes of text, 5 tokens at
    # most): an estimate of 27 billed more than any provider could have.
    capped = ProviderRequest(prompt=PROMPT, max_tokens=5)
    async with client.stream(capped) as stream:
        _ = [text async for text in stream]
    assert stream.completion is not None and stream.completion.usage.output_tokens == 5


async def test_a_stream_closed_early_frees_the_connection(client_for: ClientFactory) -> None:
    client = client_for("anthropic", "len-50")

    async with client.stream(ProviderRequest(prompt=PROMPT)) as stream:
        async for _ in stream:
            break
    done = await client.complete(ProviderRequest(prompt="still works"))

    assert stream.completion is None
    assert done.text.split() == ["still", "works"] * 25  # len-50 cycles the prompt's words


async def test_latency_estimate_is_observed(client_for: ClientFactory) -> None:
    client = client_for("openai", "slow-30")
    assert client.latency_estimate() is None

    await client.complete(ProviderRequest(prompt="hi"))
    await client.complete(ProviderRequest(prompt="hi"))

    estimate = client.latency_estimate()
    assert estimate is not None and estimate >= 30  # the simulator waited 30 ms each time


async def test_first_token_waits_for_the_simulated_ttft(client_for: ClientFactory) -> None:
    client = client_for("gemini", "ttft-60")

    async with client.stream(ProviderRequest(prompt=PROMPT)) as stream:
        _ = [text async for text in stream]

    assert stream.completion is not None
    assert stream.completion.first_token_ms is not None
    # The simulator's 60 ms wait is a loop timer, which may fire up to a clock tick (1 ms)
    # early: 59.9 ms was measured once. What is checked is that the wait is measured at all.
    assert stream.completion.first_token_ms >= 59
    assert client.first_token_estimate() == stream.completion.first_token_ms


@pytest.mark.parametrize("kind", KINDS)
async def test_estimate_cost_bounds_the_actual_cost(kind: str, client_for: ClientFactory) -> None:
    client = client_for(kind, "cachew-40")
    prompts = ["x", PROMPT, "word " * 200, "a-much-longer-token-free-string" * 30]

    for prompt in prompts:
        request = ProviderRequest(prompt=prompt, system="sys", max_tokens=500)
        done = await client.complete(request)
        assert client.estimate_cost(request) >= done.cost_usd


def test_estimate_cost_is_the_input_bound_plus_max_tokens_of_output() -> None:
    client = make_client(name="o", kind="openai", model="m", price=price_of("openai"))
    request = ProviderRequest(prompt="x" * 30)  # 30 bytes, 4 for the message, 8 for the reply

    estimate = client.estimate_cost(request)

    assert input_token_bound(request) == 42
    assert estimate == (42 * Decimal("2.5") + DEFAULT_MAX_TOKENS * 10) / 1_000_000


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
async def test_paid_provider_is_available_only_with_a_key(kind: str, sim: Simulator) -> None:
    with_key = make_client(name=kind, kind=kind, model="m", price=price_of(kind), api_key=SECRET)
    without = make_client(name=kind, kind=kind, model="m", price=price_of(kind), api_key="")

    assert await with_key.available() is True
    assert await without.available() is False
    with pytest.raises(ProviderConfigError) as caught:
        await without.complete(ProviderRequest(prompt="hi"))
    assert caught.value.error_type == "missing_api_key"
    await with_key.aclose()
    await without.aclose()


async def test_ollama_health_is_a_real_check_cached_briefly(sim: Simulator) -> None:
    now = [1000.0]
    client = make_client(
        name="ollama",
        kind="ollama",
        model="llama3.2",
        price=price_of("ollama"),
        base_url=sim.base_url,
        health_ttl=5.0,
        clock=lambda: now[0],
    )

    assert await client.available() is True
    sim.control({"provider": "ollama", "fail_for_s": 60})
    now[0] += 1.0
    assert await client.available() is True  # cached
    now[0] += 5.0
    assert await client.available() is False  # re-checked: the server answers 503
    await client.aclose()


async def test_ollama_unreachable_is_unavailable() -> None:
    port = _closed_port()
    client = make_client(
        name="ollama",
        kind="ollama",
        model="llama3.2",
        price=price_of("ollama"),
        base_url=f"http://127.0.0.1:{port}",
    )

    assert await client.available() is False
    with pytest.raises(ProviderUnavailable):
        await client.complete(ProviderRequest(prompt="hi"))
    await client.aclose()


async def test_transport_is_injectable(sim: Simulator) -> None:
    seen: list[str] = []

    class Recording(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    client = make_client(
        name="claude",
        kind="anthropic",
        model="claude-sonnet-4-6",
        price=price_of("anthropic"),
        api_key=SECRET,
        base_url=sim.base_url,
        transport=Recording(),
    )
    done = await client.complete(ProviderRequest(prompt="via the seam"))
    await client.aclose()

    assert done.text == "via the seam"
    assert seen == ["POST /v1/messages"]


async def test_one_connection_pool_is_reused_across_calls(
    sim: Simulator, client_for: ClientFactory
) -> None:
    client = client_for("openai")
    for _ in range(5):
        await client.complete(ProviderRequest(prompt="again"))

    assert len(sim.app.requests) == 5
    assert sim.open_connections == 1  # keep-alive: one TCP connection for five calls


def test_factory_rejects_an_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="mistral"):
        make_client(name="m", kind="mistral", model="x", price=price_of("openai"))


def test_factory_defaults_to_the_public_base_urls() -> None:
    client = make_client(name="g", kind="gemini", model="x", price=price_of("gemini"))
    assert client.base_url == DEFAULT_BASE_URLS["gemini"]
    assert DEFAULT_BASE_URLS == {
        "anthropic": "https://api.anthropic.com",
        "openai": "https://api.openai.com/v1",
        "gemini": "https://generativelanguage.googleapis.com",
        "ollama": "http://localhost:11434",
    }


def test_request_needs_exactly_one_of_prompt_or_messages() -> None:
    with pytest.raises(InvalidRequest):
        ProviderRequest()
    with pytest.raises(InvalidRequest):
        ProviderRequest(prompt="a", messages=[ChatMessage(role="user", content="b")])
    with pytest.raises(InvalidRequest):
        ProviderRequest(messages=[])


def test_request_from_a_provider_call() -> None:
    call = ProviderCall(
        task_id="t1",
        task_type=TaskType.GENERAL_QUERY,
        attempt=1,
        model="gpt-4o",
        prompt="hi",
        system="s",
        max_tokens=7,
        temperature=0.5,
    )

    request = ProviderRequest.from_call(call)

    assert (request.prompt, request.system, request.max_tokens) == ("hi", "s", 7)
    assert (request.temperature, request.model) == (0.5, "gpt-4o")


def test_completion_converts_to_the_call_result() -> None:
    from vapora.providers import Completion

    done = Completion(
        provider="p",
        model="m",
        text="t",
        finish_reason="stop",
        usage=Usage(input_tokens=1, output_tokens=2),
        cost_usd=Decimal("0.5"),
        price=price_of("openai"),
        latency_ms=3.0,
        first_token_ms=1.0,
        chunks=2,
    )

    result = done.to_call_result()

    assert (result.text, result.cost_usd, result.chunks, result.first_token_ms) == (
        "t",
        Decimal("0.5"),
        2,
        1.0,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _anthropic_message(usage: dict[str, object]) -> dict[str, object]:
    """A whole Anthropic answer, "hi there", with ``usage`` as given."""
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": "hi there"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }


_NONSENSE = {
    "openai": {
        "id": "chatcmpl-1",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi there"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": -1000000, "completion_tokens": 1e30},
    },
    # A negative part hidden in a plausible sum: -1000000 + 1000005 = 5 input tokens.
    "anthropic": _anthropic_message(
        {
            "input_tokens": -1000000,
            "output_tokens": -1000000,
            "cache_read_input_tokens": 1000005,
        }
    ),
}


async def _completed_with(kind: str, answer: dict[str, Any]) -> Any:
    """A completion whose provider's 200 answer is ``answer`` (a stub server on loopback)."""
    body = msgspec.json.encode(answer)
    answered = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    async with stub(answered) as port:
        client = make_client(
            name=kind,
            kind=kind,
            model=answer["model"],
            price=price_of(kind),
            api_key="sk-test",
            base_url=f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else ""),
            timeout=5.0,
        )
        try:
            return await client.complete(ProviderRequest(prompt=PROMPT, max_tokens=50))
        finally:
            await client.aclose()


@pytest.mark.parametrize("kind", sorted(_NONSENSE))
async def test_token_counts_that_are_not_counts_are_estimated_not_billed(kind: str) -> None:
    """A negative count billed a negative cost, and the events it went into could not be read
    back (every projection stopped on them); a count of 1e30 overflowed the ledger."""
    done = await _completed_with(kind, _NONSENSE[kind])
    assert done.text == "hi there" and done.usage_estimated is True
    msgspec.convert(msgspec.to_builtins(done.usage), Usage)  # within the contract's bounds
    assert done.usage.cache_read_tokens + done.usage.cache_write_tokens <= done.usage.input_tokens
    assert done.usage.cache_read_tokens < 1000  # nothing of the nonsense billed
    assert 0 < done.cost_usd < 1


def test_the_input_bound_counts_every_utf8_byte_of_non_ascii_text() -> None:
    """1.2 x chars/3 gave 1,000 Chinese characters 405 tokens; tokenizers give them 1,000 or
    more, so the reservation was no upper bound. The bound counts a token per UTF-8 byte."""
    chinese = input_token_bound(ProviderRequest(prompt="中" * 1000))
    assert chinese == 3 * 1000 + 4 + 8  # three bytes each, the message's and the reply's tokens
    assert input_token_bound(ProviderRequest(prompt="x" * 999)) == 999 + 4 + 8


@pytest.mark.parametrize(
    ("hour", "billed_hour"),
    [(20, 20), (500, 50), (-5, 50), ("twenty", 50)],
)
async def test_anthropic_hour_long_writes_that_are_no_part_of_the_writes_bill_them_all_so(
    hour: object, billed_hour: int
) -> None:
    # More hour-long writes than writes, or a count that is none: which writes lasted an hour
    # is not known, so all of them are billed at that (dearer) rate, never fewer.
    done = await _completed_with(
        "anthropic",
        _anthropic_message(
            {
                "input_tokens": 10,
                "output_tokens": 2,
                "cache_creation_input_tokens": 50,
                "cache_creation": {"ephemeral_1h_input_tokens": hour},
            }
        ),
    )
    assert done.usage.input_tokens == 60 and done.usage.cache_write_tokens == 50
    assert done.usage.cache_write_1h_tokens == billed_hour
