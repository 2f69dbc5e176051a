"""The official SDKs referee the simulator and our clients (test-only dependencies).

1. Each SDK, pointed at the simulator, parses its answers (plain and streamed) and its errors into
   its own types, and reports the same usage as our client.
2. Golden requests: for the same request, our client sends what the SDK sends (method, path,
   query, the headers that matter, and the JSON body), so our requests are right too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from events.contract import ChatMessage, Usage
from tests.providers.conftest import MODELS, SECRET, ClientFactory
from vapora.providers import ProviderRequest
from vapora.simulator import RecordedRequest, Simulator

pytestmark = pytest.mark.anyio

PROMPT = "alpha beta gamma delta"
SUFFIX = "cached-12-cachew-5-thoughts-4"


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    """Close every SDK client a test made, inside its own event loop."""
    yield
    while _OPEN:
        client = _OPEN.pop()
        if isinstance(client, genai.Client):
            await client.aio.aclose()
        else:
            await client.close()


def _anthropic(sim: Simulator) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(api_key=SECRET, base_url=sim.base_url, max_retries=0)
    _OPEN.append(client)
    return client


def _openai(sim: Simulator) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(api_key=SECRET, base_url=sim.base_url + "/v1", max_retries=0)
    _OPEN.append(client)
    return client


def _genai(sim: Simulator, api_version: str = "v1beta") -> genai.Client:
    options = genai_types.HttpOptions(base_url=sim.base_url, api_version=api_version)
    client = genai.Client(api_key=SECRET, http_options=options)
    _OPEN.append(client)
    return client


def _ollama(sim: Simulator) -> ollama.AsyncClient:
    client = ollama.AsyncClient(host=sim.base_url)
    _OPEN.append(client)
    return client


# --- 1. the SDKs parse the simulator's answers and agree with us on usage -----------------------


async def _ours(client_for: ClientFactory, kind: str, streaming: bool) -> tuple[str, Usage]:
    client = client_for(kind, SUFFIX)
    request = ProviderRequest(prompt=PROMPT, max_tokens=64)
    if not streaming:
        done = await client.complete(request)
        return done.text, done.usage
    async with client.stream(request) as stream:
        _ = [text async for text in stream]
    assert stream.completion is not None
    return stream.completion.text, stream.completion.usage


async def _anthropic_sdk(sim: Simulator, streaming: bool) -> tuple[str, Usage]:
    sdk = _anthropic(sim)
    kwargs: dict[str, Any] = {
        "model": f"{MODELS['anthropic']}-{SUFFIX}",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if streaming:
        async with sdk.messages.stream(**kwargs) as stream:
            text = "".join([t async for t in stream.text_stream])
            message = await stream.get_final_message()
    else:
        message = await sdk.messages.create(**kwargs)
        text = "".join(b.text for b in message.content if b.type == "text")
    u = message.usage
    read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    usage = Usage(
        input_tokens=u.input_tokens + read + write,
        output_tokens=u.output_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )
    return text, usage


async def _openai_sdk(sim: Simulator, streaming: bool) -> tuple[str, Usage]:
    sdk = _openai(sim)
    kwargs: dict[str, Any] = {
        "model": f"{MODELS['openai']}-{SUFFIX}",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": 64,
    }
    if streaming:
        stream = await sdk.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        parts, usage_obj = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage_obj = chunk.usage or usage_obj
        text = "".join(parts)
    else:
        completion = await sdk.chat.completions.create(**kwargs)
        text, usage_obj = completion.choices[0].message.content or "", completion.usage
    assert usage_obj is not None
    details = usage_obj.prompt_tokens_details
    usage = Usage(
        input_tokens=usage_obj.prompt_tokens,
        output_tokens=usage_obj.completion_tokens,
        cache_read_tokens=(details.cached_tokens or 0) if details else 0,
        cache_write_tokens=(details.cache_write_tokens or 0) if details else 0,
    )
    return text, usage


async def _genai_sdk(sim: Simulator, streaming: bool) -> tuple[str, Usage]:
    sdk = _genai(sim).aio
    model = f"{MODELS['gemini']}-{SUFFIX}"
    config = genai_types.GenerateContentConfig(max_output_tokens=64)
    if streaming:
        parts, meta = [], None
        async for chunk in await sdk.models.generate_content_stream(
            model=model, contents=PROMPT, config=config
        ):
            parts.append(chunk.text or "")
            meta = chunk.usage_metadata or meta
        text = "".join(parts)
    else:
        response = await sdk.models.generate_content(model=model, contents=PROMPT, config=config)
        text, meta = response.text or "", response.usage_metadata
    assert meta is not None
    usage = Usage(
        input_tokens=(meta.prompt_token_count or 0) + (meta.tool_use_prompt_token_count or 0),
        output_tokens=(meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0),
        cache_read_tokens=meta.cached_content_token_count or 0,
    )
    return text, usage


async def _ollama_sdk(sim: Simulator, streaming: bool) -> tuple[str, Usage]:
    sdk = _ollama(sim)
    model = f"{MODELS['ollama']}-{SUFFIX}"
    options = {"num_predict": 64}
    if streaming:
        parts, last = [], None
        async for chunk in await sdk.generate(
            model=model, prompt=PROMPT, options=options, stream=True
        ):
            parts.append(chunk.response)
            last = chunk
        text = "".join(parts)
    else:
        last = await sdk.generate(model=model, prompt=PROMPT, options=options)
        text = last.response
    assert last is not None and last.done
    usage = Usage(input_tokens=last.prompt_eval_count or 0, output_tokens=last.eval_count or 0)
    return text, usage


SDKS = {
    "anthropic": _anthropic_sdk,
    "openai": _openai_sdk,
    "gemini": _genai_sdk,
    "ollama": _ollama_sdk,
}


@pytest.mark.parametrize("kind", list(SDKS))
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_sdk_parses_the_answer_and_agrees_on_usage(
    kind: str, streaming: bool, sim: Simulator, client_for: ClientFactory
) -> None:
    sdk_text, sdk_usage = await SDKS[kind](sim, streaming)
    our_text, our_usage = await _ours(client_for, kind, streaming)

    assert sdk_text == our_text == PROMPT
    assert sdk_usage == our_usage
    assert our_usage.output_tokens >= 4  # the answer's four words (plus thoughts where billed)
    if kind != "ollama":
        assert our_usage.cache_read_tokens == 12


async def test_google_sdk_default_v1_path_is_served(sim: Simulator) -> None:
    response = await _genai(sim, api_version="v1").aio.models.generate_content(
        model=MODELS["gemini"], contents=PROMPT
    )

    assert response.text == PROMPT
    assert sim.requests[-1].path == f"/v1/models/{MODELS['gemini']}:generateContent"


async def test_ollama_sdk_lists_models_and_chats(sim: Simulator) -> None:
    sdk = _ollama(sim)

    listed = await sdk.list()
    answer = await sdk.chat(model="llama3.2", messages=[{"role": "user", "content": PROMPT}])

    assert listed.models and listed.models[0].model == "llama3.2:latest"
    assert answer.message.content == PROMPT and answer.done_reason == "stop"


# --- the SDKs' own error types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "error_class"),
    [
        ("error-429", anthropic.RateLimitError),
        ("error-529", anthropic.OverloadedError),
        ("error-500", anthropic.InternalServerError),
        ("error-400", anthropic.BadRequestError),
        ("error-401", anthropic.AuthenticationError),
        ("error-402", anthropic.PaymentRequiredError),
        ("error-404", anthropic.NotFoundError),
        ("quota", anthropic.RateLimitError),
    ],
)
async def test_anthropic_sdk_raises_its_own_errors(
    suffix: str, error_class: type[Exception], sim: Simulator
) -> None:
    with pytest.raises(error_class) as caught:
        await _anthropic(sim).messages.create(
            model=f"claude-sonnet-4-6-{suffix}",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
        )
    if suffix == "quota":
        assert caught.value.error_code == "enforced_spend_limit_reached"  # type: ignore[attr-defined]


async def test_the_sdks_see_a_context_overflow_as_their_providers_send_it(sim: Simulator) -> None:
    """The simulator's ``ctx-<n>`` refusals, as each official SDK reads them."""
    long = "word " * 40  # 200 characters: 50 tokens as the simulator counts them
    with pytest.raises(anthropic.BadRequestError) as refused:
        await _anthropic(sim).messages.create(
            model="claude-sonnet-4-6-ctx-20",
            max_tokens=5,
            messages=[{"role": "user", "content": long}],
        )
    assert refused.value.body["error"]["message"] == "prompt is too long: 50 tokens > 20 maximum"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as rejected:
        await _openai(sim).chat.completions.create(
            model="gpt-4o-ctx-20", messages=[{"role": "user", "content": long}]
        )
    assert (rejected.value.code, rejected.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(genai_errors.ClientError) as failed:
        await _genai(sim).aio.models.generate_content(
            model="gemini-2.5-flash-ctx-20", contents=long
        )
    assert (failed.value.code, failed.value.status) == (400, "INVALID_ARGUMENT")
    assert "exceeds the maximum number of tokens allowed (20)" in (failed.value.message or "")


async def test_anthropic_sdk_raises_on_an_error_event_after_200(sim: Simulator) -> None:
    sdk = _anthropic(sim)
    with pytest.raises(anthropic.APIError):
        async with sdk.messages.stream(
            model="claude-sonnet-4-6-error-after-200",
            max_tokens=50,
            messages=[{"role": "user", "content": PROMPT}],
        ) as stream:
            async for _ in stream.text_stream:
                pass


@pytest.mark.parametrize(
    ("suffix", "error_class", "code"),
    [
        ("error-429", openai.RateLimitError, "rate_limit_exceeded"),
        ("quota", openai.RateLimitError, "insufficient_quota"),
        ("error-500", openai.InternalServerError, None),
        ("error-400", openai.BadRequestError, None),
        ("error-401", openai.AuthenticationError, "invalid_api_key"),
        ("error-404", openai.NotFoundError, "model_not_found"),
        ("error-422", openai.UnprocessableEntityError, None),
    ],
)
async def test_openai_sdk_raises_its_own_errors(
    suffix: str, error_class: type[openai.APIStatusError], code: str | None, sim: Simulator
) -> None:
    with pytest.raises(error_class) as caught:
        await _openai(sim).chat.completions.create(
            model=f"gpt-4o-{suffix}", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == code


async def test_openai_sdk_raises_on_an_error_chunk_after_200(sim: Simulator) -> None:
    stream = await _openai(sim).chat.completions.create(
        model="gpt-4o-error-after-200", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.parametrize(
    ("suffix", "error_class", "code", "status"),
    [
        ("error-429", genai_errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ("quota", genai_errors.ClientError, 400, "FAILED_PRECONDITION"),
        ("error-401", genai_errors.ClientError, 400, "INVALID_ARGUMENT"),
        ("error-403", genai_errors.ClientError, 403, "PERMISSION_DENIED"),
        ("error-500", genai_errors.ServerError, 500, "INTERNAL"),
        ("error-503", genai_errors.ServerError, 503, "UNAVAILABLE"),
    ],
)
async def test_google_sdk_raises_its_own_errors(
    suffix: str, error_class: type[genai_errors.APIError], code: int, status: str, sim: Simulator
) -> None:
    with pytest.raises(error_class) as caught:
        await _genai(sim).aio.models.generate_content(
            model=f"gemini-2.5-flash-{suffix}", contents="x"
        )
    assert (caught.value.code, caught.value.status) == (code, status)


async def test_google_sdk_raises_on_an_error_chunk_after_200(sim: Simulator) -> None:
    with pytest.raises(genai_errors.ServerError):
        async for _ in await _genai(sim).aio.models.generate_content_stream(
            model="gemini-2.5-flash-error-after-200", contents=PROMPT
        ):
            pass


@pytest.mark.parametrize(
    ("suffix", "status"), [("error-404", 404), ("error-500", 500), ("error-429", 429)]
)
async def test_ollama_sdk_raises_its_own_errors(suffix: str, status: int, sim: Simulator) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        await _ollama(sim).chat(
            model=f"llama3.2-{suffix}", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == status


async def test_ollama_sdk_raises_on_an_error_line_after_200(sim: Simulator) -> None:
    with pytest.raises(ollama.ResponseError):
        async for _ in await _ollama(sim).chat(
            model="llama3.2-error-after-200",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
        ):
            pass


# --- 2. golden requests: ours == the SDK's -------------------------------------------------------

HEADERS_THAT_MATTER = {
    "anthropic": ("authorization", "anthropic-version", "content-type", "x-api-key"),
    "openai": ("authorization", "content-type"),
    "gemini": ("x-goog-api-key", "content-type", "authorization"),
    "ollama": ("authorization", "content-type"),
}
MESSAGES = [
    ChatMessage(role="user", content="first question"),
    ChatMessage(role="assistant", content="first answer"),
    ChatMessage(role="user", content=PROMPT),
]


def _essence(kind: str, recorded: RecordedRequest) -> dict[str, Any]:
    headers = {k: recorded.headers.get(k) for k in HEADERS_THAT_MATTER[kind]}
    return {
        "method": recorded.method,
        "path": recorded.path,
        "query": recorded.query,
        "headers": headers,
        "body": recorded.json(),
    }


async def _sdk_request(kind: str, case: str, sim: Simulator) -> None:
    """The SDK call for one golden case (answers are not looked at here)."""
    history = [{"role": m.role, "content": m.content} for m in MESSAGES]
    if kind == "anthropic":
        sdk = _anthropic(sim)
        if case == "prompt":
            await sdk.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=50,
                system="be brief",
                messages=[{"role": "user", "content": PROMPT}],
            )
        else:
            stream = await sdk.messages.create(
                model="claude-sonnet-4-6", max_tokens=4096, messages=history, stream=True
            )
            async for _ in stream:
                pass
    elif kind == "openai":
        sdk_o = _openai(sim)
        if case == "prompt":
            await sdk_o.chat.completions.create(
                model="gpt-4o",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": PROMPT},
                ],
                max_completion_tokens=50,
                temperature=0.5,
            )
        else:
            stream_o = await sdk_o.chat.completions.create(
                model="gpt-4o",
                messages=history,
                max_completion_tokens=4096,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for _ in stream_o:
                pass
    elif kind == "gemini":
        aio = _genai(sim).aio
        if case == "prompt":
            config = genai_types.GenerateContentConfig(
                system_instruction="be brief", max_output_tokens=50, temperature=0.5
            )
            await aio.models.generate_content(
                model="gemini-2.5-flash", contents=PROMPT, config=config
            )
        else:
            contents = [
                genai_types.Content(
                    role="model" if m.role == "assistant" else "user",
                    parts=[genai_types.Part(text=m.content)],
                )
                for m in MESSAGES
            ]
            config = genai_types.GenerateContentConfig(max_output_tokens=4096)
            async for _ in await aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents=contents, config=config
            ):
                pass
    else:
        sdk_l = _ollama(sim)
        if case == "prompt":
            await sdk_l.generate(
                model="llama3.2",
                prompt=PROMPT,
                system="be brief",
                options={"num_predict": 50, "temperature": 0.5},
            )
        else:
            async for _ in await sdk_l.chat(
                model="llama3.2", messages=history, stream=True, options={"num_predict": 4096}
            ):
                pass


async def _our_request(kind: str, case: str, client_for: ClientFactory) -> None:
    client = client_for(kind, api_key=None) if kind == "ollama" else client_for(kind)
    client.model = {
        "anthropic": "claude-sonnet-4-6",
        "openai": "gpt-4o",
        "gemini": "gemini-2.5-flash",
        "ollama": "llama3.2",
    }[kind]
    if case == "prompt":
        await client.complete(
            ProviderRequest(prompt=PROMPT, system="be brief", max_tokens=50, temperature=0.5)
        )
    else:
        async with client.stream(ProviderRequest(messages=MESSAGES)) as stream:
            async for _ in stream:
                pass


@pytest.mark.parametrize("kind", list(SDKS))
@pytest.mark.parametrize("case", ["prompt", "messages-stream"])
async def test_our_request_is_the_sdk_request(
    kind: str, case: str, sim: Simulator, client_for: ClientFactory
) -> None:
    await _sdk_request(kind, case, sim)
    await _our_request(kind, case, client_for)

    sdk_sent, we_sent = sim.requests[-2], sim.requests[-1]
    assert _essence(kind, we_sent) == _essence(kind, sdk_sent)
