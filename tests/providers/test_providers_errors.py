"""Every error class, for every client, from the simulator's real error answers (providers.md)."""

from __future__ import annotations

import pytest

from tests.providers.conftest import ClientFactory
from vapora.errors import (
    ProviderConfigError,
    ProviderContextOverflow,
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderStreamBroken,
    ProviderTimeout,
    ProviderUnavailable,
)
from vapora.providers import ProviderClient, ProviderRequest, StreamBroken, may_reason
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio

KINDS = ["anthropic", "openai", "gemini", "ollama"]
REQUEST = ProviderRequest(prompt="one two three four five six", max_tokens=100)

# (model suffix, error class, whether the router may fall back)
CASES: list[tuple[str, type[ProviderError], bool]] = [
    ("error-429", ProviderRateLimited, True),
    ("error-529", ProviderUnavailable, True),
    ("error-500", ProviderUnavailable, True),
    ("error-503", ProviderUnavailable, True),
    ("error-408", ProviderUnavailable, True),
    ("error-504", ProviderTimeout, True),
    ("error-400", ProviderRejected, False),
    ("error-413", ProviderRejected, False),
    ("error-422", ProviderRejected, False),
    ("error-401", ProviderConfigError, True),
    ("error-403", ProviderConfigError, True),
    ("error-404", ProviderConfigError, True),
    ("quota", ProviderQuotaExhausted, True),
    ("malformed", ProviderUnavailable, True),
    ("drop", ProviderUnavailable, True),  # the connection closed before the first byte
]


async def _first_error(client: ProviderClient, streaming: bool) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        if streaming:
            async with client.stream(REQUEST) as stream:
                async for _ in stream:
                    pass
        else:
            await client.complete(REQUEST)
    return caught.value


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("suffix", "error_class", "fallback"), CASES)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_each_failure_raises_its_error_class(
    kind: str,
    suffix: str,
    error_class: type[ProviderError],
    fallback: bool,
    streaming: bool,
    client_for: ClientFactory,
) -> None:
    error = await _first_error(client_for(kind, suffix), streaming)

    assert type(error) is error_class  # not StreamBroken: nothing was streamed yet
    assert error.fallback is fallback
    assert error.provider == f"{kind}-sim"
    assert error.message.startswith(f"{kind}-sim: ")
    if suffix.startswith("error-") and not (kind == "gemini" and suffix == "error-401"):
        assert error.http_status == int(suffix.removeprefix("error-"))


@pytest.mark.parametrize(
    ("kind", "error_type", "status"),
    [
        ("anthropic", "rate_limit_error", 429),  # enforced_spend_limit_reached, no retry-after
        ("openai", "insufficient_quota", 429),
        ("gemini", "FAILED_PRECONDITION", 400),
        ("ollama", None, 402),
    ],
)
async def test_quota_exhaustion_is_told_apart_from_rate_limits(
    kind: str, error_type: str | None, status: int, client_for: ClientFactory
) -> None:
    error = await _first_error(client_for(kind, "quota"), streaming=False)

    assert isinstance(error, ProviderQuotaExhausted)
    assert not isinstance(error, ProviderRateLimited)
    assert (error.error_type, error.http_status) == (error_type, status)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_an_input_longer_than_the_context_window_is_an_overflow(
    kind: str, streaming: bool, client_for: ClientFactory
) -> None:
    # The prompt is 7 tokens as the simulator counts them; each dialect refuses it in its own
    # words (Anthropic "prompt is too long", OpenAI code context_length_exceeded, Gemini "The
    # input token count ... exceeds", Ollama "the input length exceeds the context length").
    error = await _first_error(client_for(kind, "ctx-3"), streaming)

    assert type(error) is ProviderContextOverflow
    assert isinstance(error, ProviderRejected)  # a caller error for this model
    assert error.error_class == "context_overflow"
    assert error.http_status == 400
    # A plain 400 is not one, nor is an input that fits.
    assert type(await _first_error(client_for(kind, "error-400"), streaming)) is ProviderRejected
    fits = client_for(kind, "ctx-7")
    answer = await fits.complete(REQUEST)
    assert answer.usage.input_tokens == 7


async def test_anthropic_billing_error_402_is_quota(client_for: ClientFactory) -> None:
    error = await _first_error(client_for("anthropic", "error-402"), streaming=False)
    assert isinstance(error, ProviderQuotaExhausted) and error.error_type == "billing_error"


@pytest.mark.parametrize(
    ("kind", "retry_after"),
    [
        ("anthropic", 3.0),  # retry-after: 3 (whole seconds, rounded up from 2.5)
        ("openai", 2.5),  # retry-after-ms: 2500 wins over retry-after
        ("gemini", 2.5),  # google.rpc.RetryInfo retryDelay "2.5s" in the body
        ("ollama", 3.0),  # retry-after: 3
    ],
)
async def test_rate_limit_carries_the_wait_the_provider_asked_for(
    kind: str, retry_after: float, client_for: ClientFactory
) -> None:
    error = await _first_error(client_for(kind, "error-429-retryms-2500"), streaming=False)

    assert isinstance(error, ProviderRateLimited)
    assert error.retry_after == retry_after


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_spend_caps_carry_no_wait(kind: str, client_for: ClientFactory) -> None:
    error = await _first_error(client_for(kind, "quota"), streaming=False)
    assert not hasattr(error, "retry_after") or error.retry_after is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_hang_times_out(kind: str, streaming: bool, client_for: ClientFactory) -> None:
    error = await _first_error(client_for(kind, "hang", timeout=0.3), streaming)

    assert type(error) is ProviderTimeout
    assert error.fallback is True


@pytest.mark.parametrize("kind", KINDS)
async def test_slow_first_token_times_out_before_any_chunk(
    kind: str, client_for: ClientFactory
) -> None:
    client = client_for(kind, "ttft-2000")

    with pytest.raises(ProviderTimeout) as caught:
        async with client.stream(REQUEST, first_token_limit=0.2) as stream:
            async for _ in stream:
                pass

    assert not isinstance(caught.value, ProviderStreamBroken)


# Partial usage after a cut at 3 chunks ("one two three", 13 characters):
# - Anthropic reported input in message_start (7); output is estimated from the text: ceil(13/3).
# - Gemini reports cumulative counts in every chunk: 7 in, and 3 out so far; the answer was
#   cut, so the provider may have made more than its last count said: the output is the larger
#   of that count and the text's bound (13). (A model that does not think: gemini-2.0-flash.)
# - OpenAI and Ollama report nothing before the end: both estimated, the input from the
#   request (ceil(ceil(27/3) x 1.2) + 4 for the message = 15).
# (input, output): reported counts, or bounds where the provider sent none by the cut (a
# token per UTF-8 byte: "one two three" is 13; the input's bound adds the template's tokens).
PLAIN_MODELS = {"gemini": "gemini-2.0-flash"}
PARTIAL = {
    "anthropic": (7, 13),
    "gemini": (7, 13),
    "openai": (39, 13),
    "ollama": (39, 13),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_cut_midway_keeps_the_partial_text_and_usage(
    kind: str, client_for: ClientFactory
) -> None:
    client = client_for(kind, "cut-3", model=PLAIN_MODELS.get(kind))
    received = []

    with pytest.raises(StreamBroken) as caught:
        async with client.stream(REQUEST) as stream:
            async for text in stream:
                received.append(text)

    broken = caught.value
    assert isinstance(broken, ProviderStreamBroken) and broken.fallback is False
    assert "".join(received) == broken.partial_text == stream.text == "one two three"
    assert (broken.usage.input_tokens, broken.usage.output_tokens) == PARTIAL[kind]
    assert stream.completion is None


# A model that reasons bills its reasoning as output and does not stream it (OpenAI's o-series,
# Gemini 2.5 unless its chunks count the thoughts; Claude's thinking comes as a summarised
# block): a stream of one cut before its usage was reported may have cost its whole output limit
# (100), whatever its text says. The simulator thinks 60 tokens before the text. (A model not
# named as a reasoner is bounded by its text: the cases of PARTIAL above.)
REASONERS = [
    ("openai", "o4-mini"),
    ("gemini", "gemini-2.5-flash"),
    ("anthropic", "claude-sonnet-4-6"),  # its thinking block: output it does not show
]


@pytest.mark.parametrize(
    ("model", "reasons"),
    [
        *[(m, True) for m in ("o1", "o3-mini", "o4-mini-2025-04-16", "ft:o4-mini:org:x")],
        *[(m, True) for m in ("gpt-5", "gpt-5-mini", "gpt-5.1", "codex-mini-latest")],
        *[(m, True) for m in ("gemini-2.5-flash", "models/gemini-2.5-pro", "gemini-3-pro")],
        *[(m, True) for m in ("gemini-flash-latest", "gemini-pro-latest", "grok-4", "grok-3-mini")],
        *[(m, True) for m in ("deepseek-r1:7b", "qwen3:8b", "qwq", "gpt-oss:20b", "glm-4.6")],
        *[(m, True) for m in ("magistral-medium", "phi4-reasoning", "qwen3-30b-thinking-2507")],
        *[(m, True) for m in ("glm-5", "grok-code-fast-1")],
        *[(m, False) for m in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "chatgpt-4o-latest")],
        *[(m, False) for m in ("gpt-5-chat-latest", "claude-sonnet-4-5", "claude-opus-4-1")],
        *[(m, False) for m in ("gemini-2.0-flash", "gemini-1.5-pro", "grok-3", "llama3.2")],
        *[(m, False) for m in ("qwen3-coder:30b", "qwen3-235b-a22b-instruct-2507", "mistral")],
        *[(m, False) for m in ("deepseek-chat", "gemma3", "text-embedding-3-small")],
    ],
)
def test_which_models_may_reason_without_streaming_it(model: str, reasons: bool) -> None:
    # A false "yes" bounds a cut stream (or a count left out) by the output limit, on the
    # budget's side; a false "no" estimates it from the text and misses the reasoning.
    assert may_reason(model) is reasons


@pytest.mark.parametrize(("kind", "model"), REASONERS)
async def test_a_cut_stream_of_a_model_that_reasons_is_bounded_by_its_output_limit(
    kind: str, model: str, client_for: ClientFactory
) -> None:
    whole = await client_for(kind, "thoughts-60", model=model).complete(REQUEST)
    client = client_for(kind, "thoughts-60-cut-3", model=model)

    with pytest.raises(StreamBroken) as cut:
        async with client.stream(REQUEST) as stream:
            async for _ in stream:
                pass
    cancelled = client_for(kind, "thoughts-60", model=model)
    async with cancelled.stream(REQUEST) as stream:
        async for _ in stream:
            break  # the caller stops reading: what the actor does on vapora.stream.cancel
        stopped = stream.cancelled()

    assert whole.usage.output_tokens == 66  # what the provider bills: its reasoning and text
    assert cut.value.partial_text == "one two three"
    assert cut.value.usage.output_tokens == REQUEST.max_tokens == 100
    # Cancelled: bounded, or (when the read had brought the whole answer) the provider's count.
    assert stopped.usage.output_tokens in (66, 100)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_cut_after_its_200_before_any_text_is_billed_its_input(
    kind: str, client_for: ClientFactory
) -> None:
    """The provider answered (HTTP 200): it has the request and bills its input, reported
    (Anthropic's ``message_start``) or bounded; nothing was forwarded, so the task may still
    fall back."""
    error = await _first_error(
        client_for(kind, "cut-0", model=PLAIN_MODELS.get(kind)), streaming=True
    )

    assert not isinstance(error, ProviderStreamBroken) and error.fallback is True
    # Anthropic's message_start reported it; the others report nothing before their text.
    assert error.usage.input_tokens == (7 if kind == "anthropic" else 39)
    assert error.usage.output_tokens == 0


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        ("anthropic", 529, "overloaded_error"),
        ("openai", 500, "server_error"),
        ("gemini", 500, "INTERNAL"),
        ("ollama", 500, None),
    ],
)
async def test_an_error_event_after_200_breaks_the_stream(
    kind: str, status: int, error_type: str | None, client_for: ClientFactory
) -> None:
    client = client_for(kind, "error-after-200")

    with pytest.raises(StreamBroken) as caught:
        async with client.stream(REQUEST) as stream:
            async for _ in stream:
                pass

    assert caught.value.partial_text == "one two"
    assert (caught.value.http_status, caught.value.error_type) == (status, error_type)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_event_before_any_chunk_allows_fallback(
    kind: str, client_for: ClientFactory
) -> None:
    error = await _first_error(client_for(kind, "error-after-200-cut-0"), streaming=True)

    assert not isinstance(error, ProviderStreamBroken)
    assert isinstance(error, ProviderUnavailable) and error.fallback is True


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stalled_stream_times_out_as_broken(kind: str, client_for: ClientFactory) -> None:
    client = client_for(kind, "stall-2")

    with pytest.raises(StreamBroken) as caught:
        async with client.stream(REQUEST, time_limit=0.4) as stream:
            async for _ in stream:
                pass

    assert caught.value.error_type == "timeout"
    assert caught.value.partial_text == "one two"


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
async def test_a_request_without_credentials_is_refused_by_the_simulator(
    kind: str, sim: Simulator
) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        path = {
            "anthropic": "/v1/messages",
            "openai": "/v1/chat/completions",
            "gemini": "/v1beta/models/gemini-2.5-flash:generateContent",
        }[kind]
        response = await http.post(path, json={})

    assert response.status_code in (400, 401)  # Gemini answers a bad key with 400
    assert sim.stats()["providers"][kind]["errors"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_body_the_provider_cannot_read_is_the_callers_error(
    kind: str, client_for: ClientFactory
) -> None:
    client = client_for(kind)
    # Reach below the public surface only to send what our clients never send: an empty body.
    client._body = lambda request, model, stream: {}  # type: ignore[method-assign]

    error = await _first_error(client, streaming=False)

    assert isinstance(error, ProviderRejected) and error.http_status == 400


async def test_connection_refused_is_transient() -> None:
    import socket

    from tests.providers.conftest import price_of
    from vapora.providers import make_client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(
        name="o",
        kind="openai",
        model="gpt-4o",
        price=price_of("openai"),
        api_key="k" * 20,
        base_url=f"http://127.0.0.1:{port}/v1",
    )

    error = await _first_error(client, streaming=True)

    assert type(error) is ProviderUnavailable and error.error_type == "connection"
    assert isinstance(error.__cause__, Exception)  # the httpx error, chained at the boundary
    await client.aclose()


@pytest.mark.parametrize(
    ("kind", "status", "body", "error_class"),
    [
        # Anthropic answers an empty prepaid balance or a workspace spend cap with a 400.
        (
            "anthropic",
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "Your credit balance is too low to access the Anthropic API.",
                },
            },
            ProviderQuotaExhausted,
        ),
        (
            "anthropic",
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "messages: roles must alternate",
                },
            },
            ProviderRejected,
        ),
        (
            "openai",
            429,
            {
                "error": {
                    "message": "over",
                    "type": "insufficient_quota",
                    "code": "billing_hard_limit_reached",
                }
            },
            ProviderQuotaExhausted,
        ),
        (
            "openai",
            429,
            {"error": {"message": "slow down", "type": "requests", "code": "slow_down"}},
            ProviderRateLimited,
        ),
        (
            "gemini",
            401,
            {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "no"}},
            ProviderConfigError,
        ),
        (
            "gemini",
            400,
            {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}},
            ProviderRejected,
        ),
        (
            "ollama",
            404,
            {"error": 'model "x" not found, try pulling it first'},
            ProviderConfigError,
        ),
        ("ollama", 502, {"error": "cloud model unreachable"}, ProviderUnavailable),
        ("openai", 503, "<html>upstream connect error</html>", ProviderUnavailable),
    ],
)
def test_classification_of_provider_error_bodies(
    kind: str, status: int, body: object, error_class: type[ProviderError]
) -> None:
    import msgspec

    from tests.providers.conftest import price_of
    from vapora.providers import make_client

    client = make_client(name=kind, kind=kind, model="m", price=price_of(kind), api_key="key-1")
    content = body.encode() if isinstance(body, str) else msgspec.json.encode(body)

    error = client._http_error(status, {}, content)

    assert type(error) is error_class
    assert error.http_status == status
