"""What a call is billed when the provider's counts cannot be taken as they are, or when no
answer came: counts past what the request could be billed for, counts that are not integers,
a 2xx body that is no answer but states its usage, a time limit after the request went out.
Each was billed wrongly before 2026-11-27 (by up to $90 billion for one call, or $0 for a call
the provider bills), from stub servers over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from events.codec import encode
from tests.providers.conftest import stub
from tests.providers.test_providers_answers import answer, client
from vapora.errors import ProviderError, ProviderTimeout, ProviderUnavailable
from vapora.providers import Completion, ProviderRequest, upper_bound_usage
from vapora.providers.values import (
    INPUT_TEMPLATE_ALLOWANCE,
    REASONING_ALLOWANCE,
    input_token_bound,
)

pytestmark = pytest.mark.anyio

REQUEST = ProviderRequest(prompt="a b c d", max_tokens=50)


async def _outcome(kind: str, body: dict[str, Any], request: ProviderRequest = REQUEST) -> Any:
    """The completion, or the error, of a ``kind`` client's call answered 200 with ``body``."""
    async with stub(answer("200 OK", msgspec.json.encode(body))) as port:
        made = client(kind, port)
        try:
            return await made.complete(request)
        except ProviderError as error:
            return error
        finally:
            await made.aclose()


async def _complete_failure(kind: str, response: bytes) -> ProviderError:
    """The error a ``kind`` client's call raises on ``response``, served once."""
    async with stub(response) as port:
        made = client(kind, port)
        try:
            with pytest.raises(ProviderError) as raised:
                await made.complete(REQUEST)
        finally:
            await made.aclose()
    return raised.value


async def _stream_outcome(
    kind: str, response: bytes, request: ProviderRequest = REQUEST
) -> ProviderError:
    """The error a ``kind`` client's stream raises on ``response``, served once."""
    async with stub(response) as port:
        made = client(kind, port)
        try:
            with pytest.raises(ProviderError) as raised:
                async with made.stream(request) as stream:
                    async for _ in stream:
                        pass
        finally:
            await made.aclose()
    return raised.value


async def _streamed(
    kind: str,
    port: int,
    *,
    model: str | None = None,
    request: ProviderRequest = REQUEST,
    first_token_limit: float | None = None,
) -> tuple[str, Completion]:
    """The text and the completion of a ``kind`` client's stream from the server at ``port``."""
    made = client(kind, port, model=model)
    try:
        async with made.stream(request, first_token_limit=first_token_limit) as stream:
            text = "".join([piece async for piece in stream])
    finally:
        await made.aclose()
    assert stream.completion is not None
    return text, stream.completion


async def _stub_streamed(
    kind: str, response: bytes, *, model: str | None = None
) -> tuple[str, Completion]:
    async with stub(response) as port:
        return await _streamed(kind, port, model=model)


async def _chunked_server(
    content_type: bytes, pieces: list[bytes], pause: float, status: bytes = b"200 OK"
) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
                + b"\r\ntransfer-encoding: chunked\r\n\r\n"
            )  # fmt: skip
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(pause)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left first (what some of these tests check it does)
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _gemini_chunk(text: str, output: int, finish: bool = False) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}]}}
    if finish:
        candidate["finishReason"] = "STOP"
    usage = {"promptTokenCount": 900, "candidatesTokenCount": output}
    return msgspec.json.encode({"candidates": [candidate], "usageMetadata": usage})


def _openai(usage: Any, choices: Any = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": "four words of text"}
    return {
        "id": "c1",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]
        if choices is None
        else choices,
        "usage": usage,
    }


def _anthropic(usage: Any, content: Any = "text") -> dict[str, Any]:
    blocks = [{"type": "text", "text": "four words of text"}] if content == "text" else content
    return {
        "id": "m1",
        "type": "message",
        "model": "claude-sonnet-4-6",
        "content": blocks,
        "stop_reason": "end_turn",
        "usage": usage,
    }


def _gemini(usage: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": "four words of text"}], "role": "model"},
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": usage,
    }


def _ollama(prompt_count: Any, output_count: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": "four words of text"},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": prompt_count,
        "eval_count": output_count,
    }


# --- counts past what the request can be billed for -------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", _openai({"prompt_tokens": 12, "completion_tokens": 2**53})),
        ("openai", _openai({"prompt_tokens": 12, "completion_tokens": 51})),
        ("anthropic", _anthropic({"input_tokens": 12, "output_tokens": 1_000_000_000})),
        ("gemini", _gemini({"promptTokenCount": 12, "candidatesTokenCount": 10**9})),
        ("ollama", _ollama(12, 10**9)),
    ],
    ids=["openai 2**53", "openai limit+1", "anthropic 1e9", "gemini 1e9", "ollama 1e9"],
)
async def test_an_output_count_past_the_limit_sent_is_billed_at_the_limit(
    kind: str, body: dict[str, Any]
) -> None:
    """OpenAI answering ``completion_tokens: 2**53`` for ``max_tokens=50`` was billed
    $90,071,992,547 with ``usage_estimated`` false, and that one spend put the month's budget
    in Exceeded: the provider bills no output past the limit it was sent (reasoning and
    thinking included: gemini-2.5-flash here)."""
    done = await _outcome(kind, body)
    assert not isinstance(done, ProviderError), done
    assert done.usage.output_tokens == 50
    assert done.usage.input_tokens == 12  # the input count stands
    assert done.usage_estimated
    assert done.cost_usd < 1


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", _openai({"prompt_tokens": 10**9, "completion_tokens": 4})),
        ("openai", _openai({"prompt_tokens": None, "completion_tokens": 4,
                            "prompt_tokens_details": {"cached_tokens": 10**9}})),
        ("anthropic", _anthropic({"input_tokens": 5, "cache_read_input_tokens": 10**9,
                                  "output_tokens": 4})),
        ("gemini", _gemini({"promptTokenCount": 10**9, "candidatesTokenCount": 4})),
    ],
    ids=["openai input", "openai cached, no input", "anthropic cache read", "gemini input"],
)  # fmt: skip
async def test_an_input_count_past_the_request_is_bounded_by_it(
    kind: str, body: dict[str, Any]
) -> None:
    """A billion input (or cached) tokens for a 7-character prompt was billed as such ($1,250 on
    a $0.0005 hold): the input is cut to the most the request could be billed for (its bound
    and the template allowance), estimated."""
    done = await _outcome(kind, body)
    assert not isinstance(done, ProviderError), done
    most = input_token_bound(REQUEST) + INPUT_TEMPLATE_ALLOWANCE
    if kind == "openai" and "cached" in str(body["usage"]):  # no input count: the bound
        most = input_token_bound(REQUEST)
    assert done.usage.input_tokens == most
    # Cache counts cut to fit in it (zeroed, a count a little past the most billed ten times
    # what one a little within it did).
    assert done.usage.cache_read_tokens + done.usage.cache_write_tokens <= most
    assert done.usage.output_tokens == 4 and done.usage_estimated


@pytest.mark.parametrize("past", [0, 1, 10_000])
async def test_an_input_count_within_the_template_allowance_stands(past: int) -> None:
    """A local model's chat template adds tokens the request's text does not show (a default
    system prompt, a date header): a count past the text's bound by less than the allowance is
    the provider's count, billed as given; one past it is billed at the most, never less (a
    first version billed a count one past it at the bound, 4,097 tokens less)."""
    most = input_token_bound(REQUEST) + INPUT_TEMPLATE_ALLOWANCE
    done = await _outcome("ollama", _ollama(most + past, 4))
    assert not isinstance(done, ProviderError), done
    assert (done.usage.input_tokens, done.usage_estimated) == (most, past > 0)


async def test_deepseeks_reasoner_is_billed_its_reasoning_past_the_limit_and_held_for_it() -> None:
    """DeepSeek's reasoner bounds only its answer by ``max_tokens`` and bills its reasoning (up
    to 32K) as completion tokens: such a count was cut to the limit. It keeps its count up to
    the limit and :data:`REASONING_ALLOWANCE`, and its hold covers as much; every other model
    (Gemini's thinking, OpenAI's reasoning: inside the limit) is cut to the limit, as before
    (a first version of the allowance let every model that may reason settle 24 times past its
    hold)."""
    from tests.providers.conftest import price_of
    from vapora.pricing import upper_bound_cost
    from vapora.providers.values import output_ceiling

    request = ProviderRequest(prompt="prove it", max_tokens=1000)
    body = _openai({"prompt_tokens": 10, "completion_tokens": 7000})
    async with stub(answer("200 OK", msgspec.json.encode(body))) as port:
        made = client("openai", port, model="deepseek-reasoner")
        try:
            done = await made.complete(request)
            held = made.estimate_cost(request)
        finally:
            await made.aclose()
    assert (done.usage.output_tokens, done.usage_estimated) == (7000, False)
    assert held == upper_bound_cost(
        input_token_bound(request), 1000 + REASONING_ALLOWANCE, price_of("openai")
    )
    assert done.cost_usd <= held
    assert output_ceiling("gpt-5", 1000) == output_ceiling("gemini-2.5-pro", 1000) == 1000
    thought = _gemini(
        {"promptTokenCount": 10, "candidatesTokenCount": 800, "thoughtsTokenCount": 2000}
    )
    async with stub(answer("200 OK", msgspec.json.encode(thought))) as port:
        made = client("gemini", port, model="gemini-2.5-pro")
        try:
            cut = await made.complete(request)
        finally:
            await made.aclose()
    assert (cut.usage.output_tokens, cut.usage_estimated) == (1000, True)


# --- counts that are not integers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", _openai({"prompt_tokens": 10.9, "completion_tokens": 4})),
        ("openai", _openai({"prompt_tokens": "10", "completion_tokens": 4})),
        ("openai", _openai({"prompt_tokens": True, "completion_tokens": 4})),
        ("openai", _openai({"prompt_tokens": 10, "completion_tokens": 4,
                            "prompt_tokens_details": {"cached_tokens": 5.5}})),
        ("anthropic", _anthropic({"input_tokens": True, "output_tokens": 4})),
        ("anthropic", _anthropic({"input_tokens": "n/a", "output_tokens": 4})),
        ("gemini", _gemini({"promptTokenCount": 10, "candidatesTokenCount": 4,
                            "cachedContentTokenCount": "5"})),
        ("ollama", _ollama(None, 4)),
        ("ollama", _ollama(10.9, 4)),
    ],
    ids=["openai float", "openai string", "openai true", "openai cached float",
         "anthropic true", "anthropic string", "gemini cached string", "ollama null",
         "ollama float"],
)  # fmt: skip
async def test_an_input_count_that_is_no_integer_is_estimated(
    kind: str, body: dict[str, Any]
) -> None:
    """``10.9`` became 10 and ``"10"`` 10, ``true`` 1 token and Ollama's ``null`` 0, each with
    ``usage_estimated`` false; a string made the whole answer malformed, billed $0. Such a
    count is not one: estimated (from above) like a missing one, and the answer stands."""
    done = await _outcome(kind, body)
    assert not isinstance(done, ProviderError), done
    assert done.usage.input_tokens == input_token_bound(REQUEST)
    assert done.usage.output_tokens == 4 and done.usage_estimated


# --- a 2xx body that is no answer, but states its usage --------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "output"),
    [
        ("openai", _openai({"prompt_tokens": 900, "completion_tokens": 40}, choices=[]), 40),
        ("anthropic", _anthropic({"input_tokens": 900, "output_tokens": 40}, content=None), 40),
        ("openai", _openai({"prompt_tokens": 900}, choices=[]), REQUEST.output_limit),
    ],
    ids=["openai no choices", "anthropic content null", "openai no output count"],
)
async def test_a_2xx_body_that_is_no_answer_is_billed_the_usage_it_states(
    kind: str, body: dict[str, Any], output: int
) -> None:
    """An answer whose ``choices`` was empty (or ``content`` null) was recorded at $0, though it
    said what the provider billed, and the router paid the next provider for the same request
    (a stream of the same answer was billed). It is still malformed (the router falls back),
    with that usage; a count it leaves out bounded by the output limit."""
    request = ProviderRequest(prompt="a b c d " * 200, max_tokens=50)
    failed = await _outcome(kind, body, request)
    assert isinstance(failed, ProviderUnavailable), failed
    assert failed.error_type == "malformed_response" and failed.fallback
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (900, output)


async def test_a_2xx_body_of_no_usage_is_still_billed_nothing() -> None:
    """A body that is not the provider's answer at all (no answer, no usage) carries none."""
    failed = await _outcome("openai", {"choices": []})
    assert isinstance(failed, ProviderUnavailable) and failed.error_type == "malformed_response"
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (0, 0)


# --- a time limit after the request went out ----------------------------------------------------


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request and never answers (a provider still generating)."""
    try:
        await reader.read(65536)
        await asyncio.sleep(30)
    finally:
        writer.close()


def _stalling_after(head: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """A server's handler that reads the request, sends ``head`` (a status line, headers and
    the start of a body) and then nothing more, the connection left open."""

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(head)
        await writer.drain()
        try:
            await asyncio.sleep(30)
        finally:
            writer.close()

    return stalling


def _at(
    port: int, kind: str, timeout: float, max_connections: int = 100, transport: Any = None
) -> Any:
    """A ``kind`` client of model gpt-4o for a server on ``port`` (``transport``: its own)."""
    from tests.providers.conftest import price_of
    from vapora.providers import make_client

    return make_client(
        name=kind,
        kind=kind,
        model="gpt-4o",
        price=price_of(kind),
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{port}/v1",
        timeout=timeout,
        max_connections=max_connections,
        **({"transport": transport} if transport is not None else {}),
    )


async def _timed_out_unanswered(transport: Any = None) -> ProviderTimeout:
    """The time-out of an openai client's call (0.3 s) to a server that never answers."""
    server = await asyncio.start_server(_silent, "127.0.0.1", 0)
    made = _at(server.sockets[0].getsockname()[1], "openai", 0.3, transport=transport)
    try:
        with pytest.raises(ProviderTimeout) as late:
            await made.complete(REQUEST)
    finally:
        await made.aclose()
        server.close()
    return late.value


async def test_a_call_timed_out_after_sending_is_billed_at_its_upper_bound() -> None:
    """A call the provider had when its time ran out was recorded at $0 (its hold kept, then
    expired at $0) though the provider finishes and bills it: now at the attempt's upper bound,
    class ``timeout`` (the router falls back)."""
    late = await _timed_out_unanswered()
    assert late.error_type == "timeout" and late.fallback
    assert late.usage == upper_bound_usage(REQUEST)
    assert late.usage_estimated is True
    assert "upper bound" in late.message


async def test_a_call_timed_out_before_sending_is_billed_nothing() -> None:
    """A call whose time ran out waiting for a connection (the pool's one connection busy) never
    went out: class ``timeout``, type ``connect_timeout``, nothing billed."""
    server = await asyncio.start_server(_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made = _at(port, "openai", 0.5, max_connections=1)
    try:
        busy = asyncio.ensure_future(made.complete(REQUEST))
        await asyncio.sleep(0.1)  # the one connection is the first call's
        with pytest.raises(ProviderTimeout) as waited:
            await made.complete(ProviderRequest(prompt="second", max_tokens=50), time_limit=0.2)
        with pytest.raises(ProviderTimeout):
            await busy
    finally:
        await made.aclose()
        server.close()
    assert waited.value.error_type == "connect_timeout"
    assert (waited.value.usage.input_tokens, waited.value.usage.output_tokens) == (0, 0)


async def test_a_stream_timed_out_before_its_answer_is_billed_its_input() -> None:
    """A stream sent and not answered in its time to a first chunk: the provider had the request
    (its input is billed at least): bounded, and the router still falls back."""
    server = await asyncio.start_server(_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    made = _at(port, "openai", 5.0)
    try:
        with pytest.raises(ProviderTimeout) as late:
            async with made.stream(REQUEST, first_token_limit=0.3) as stream:
                async for _ in stream:
                    pass
    finally:
        await made.aclose()
        server.close()
    assert late.value.error_type == "timeout" and late.value.fallback
    assert late.value.usage.input_tokens == input_token_bound(REQUEST)


# --- money on the wire -----------------------------------------------------------------------


def test_money_on_the_wire_is_in_plain_digits() -> None:
    """Python's ``str`` of a decimal below a millionth is ``2.25E-7`` (and a zero of seven
    places ``0E-7``), which decimal parsers of other languages refuse; text that merely looks
    like one is left as it is."""
    from decimal import Decimal

    from events.contract import Usage

    data = encode(
        {
            "cost_usd": Decimal("2.25E-7"),
            "total": [Decimal("0E-7"), Decimal("1.5")],
            "text": "E-mail 3E-7",
            "usage": Usage(input_tokens=3),
        }
    )
    assert data == (
        b'{"cost_usd":"0.000000225","total":["0.0000000","1.5"],"text":"E-mail 3E-7",'
        b'"usage":{"input_tokens":3,"output_tokens":0,"cache_read_tokens":0,'
        b'"cache_write_tokens":0}}'
    )


# --- a stream answered with a body that is no stream ------------------------------------------


async def test_a_stream_answered_with_a_page_is_malformed_and_billed_nothing() -> None:
    """A 200 HTML page (a proxy's) for a stream was read as an empty stream: "ended before its
    final event", billed at the input bound, and what the page was never said."""
    page = answer("200 OK", b"<html><body>Welcome</body></html>", "content-type: text/html\r\n")
    failed = await _stream_outcome("openai", page)
    assert isinstance(failed, ProviderUnavailable) and failed.fallback
    assert failed.error_type == "malformed_response" and "text/html" in failed.message
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (0, 0)


async def test_a_stream_answered_with_an_error_object_is_that_error() -> None:
    """A 200 carrying ``{"error": ...}`` for a stream: the provider's own error and message
    were lost; it is classified as the same body would be on a whole answer, nothing billed."""
    body = msgspec.json.encode(
        {"error": {"type": "server_error", "message": "model overloaded, try later"}}
    )
    failed = await _stream_outcome("openai", answer("200 OK", body))
    assert "model overloaded" in failed.message and failed.fallback
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (0, 0)


async def test_a_stream_answered_whole_is_billed_the_usage_it_states() -> None:
    """A server that ignored ``stream`` and answered whole: not a stream (malformed), billed
    what it says it billed."""
    body = msgspec.json.encode(_openai({"prompt_tokens": 12, "completion_tokens": 4}))
    failed = await _stream_outcome("openai", answer("200 OK", body))
    assert failed.error_type == "malformed_response" and "application/json" in failed.message
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (12, 4)


# --- the second review's cases -------------------------------------------------------------------


async def test_gemini_stated_usage_is_billed_as_stated() -> None:
    """A Gemini body that is no answer (or a stream answered whole) states 40 output tokens:
    its count was taken as a running one and replaced by the output limit (4,000); a whole
    answer without ``finishReason`` was billed by its text's bytes (400 reported, 1,800 billed)."""
    request = ProviderRequest(prompt="a b c d " * 200, max_tokens=4000)
    usage = {"promptTokenCount": 900, "candidatesTokenCount": 40}
    failed = await _outcome("gemini", {"usageMetadata": usage}, request)
    assert isinstance(failed, ProviderUnavailable)
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (900, 40)
    whole = await _stream_outcome("gemini", answer("200 OK", msgspec.json.encode(
        {"usageMetadata": usage, "candidates": [{"content": {"parts": [{"text": "x"}]}}]}
    )), request)  # fmt: skip
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (900, 40)
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 1,800 bytes
    unfinished = {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 400},
    }
    async with stub(answer("200 OK", msgspec.json.encode(unfinished))) as port:
        made = client("gemini", port, model="gemini-2.0-flash")
        try:
            done = await made.complete(ProviderRequest(prompt="write", max_tokens=8000))
        finally:
            await made.aclose()
    assert (done.usage.output_tokens, done.usage_estimated) == (400, False)


_SSE = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hello world"}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":900,"completion_tokens":30}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("kind", ["application/json", "application/json; charset=utf-8"])
async def test_a_stream_labelled_json_is_still_read_as_a_stream(kind: str) -> None:
    """A framework's default labels an SSE stream ``application/json``: it was read whole as a
    JSON body, failed to decode, and was recorded at $0 while the router paid the next
    provider. What is no JSON object is read as the stream it is."""
    text, done = await _stub_streamed("openai", answer("200 OK", _SSE, f"content-type: {kind}\r\n"))
    assert text == "hello world"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (900, 30)


async def test_a_whole_json_answer_to_a_stream_cut_while_read_is_billed_as_a_cut_answer() -> None:
    """A 2xx JSON answer to a stream whose body broke off: it was recorded at $0 (the whole
    non-streamed call records the same cut at the attempt's upper bound)."""
    request = ProviderRequest(prompt="a b c d " * 200, max_tokens=4000)
    cut = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{"
    failed = await _stream_outcome("openai", cut, request)
    assert failed.error_type == "answer_cut" and failed.fallback
    assert failed.usage == upper_bound_usage(request)
    assert failed.usage_estimated is True


async def test_through_an_https_proxy_a_call_stuck_at_connect_is_billed_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``HTTPS_PROXY`` (httpx's own transport), a proxy that never opened the tunnel left
    a call that never reached the provider recorded at its upper bound: every request was
    taken as sent. Its ``trace`` says when the request's own headers go out (a ``CONNECT``
    is traced too, with the same extensions, and is not the request)."""
    from vapora.providers import make_client

    connects: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connects.append((await reader.read(65536)).split(b"\r\n")[0])
        try:
            await asyncio.sleep(30)
        finally:
            writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    from tests.providers.conftest import price_of

    made = make_client(
        name="openai",
        kind="openai",
        model="gpt-4o",
        price=price_of("openai"),
        api_key="sk-test",
        base_url="https://api.openai.com/v1",
        timeout=5.0,
    )
    try:
        with pytest.raises(ProviderTimeout) as stuck:
            await made.complete(REQUEST, time_limit=0.5)
        with pytest.raises(ProviderTimeout) as stream_stuck:
            async with made.stream(REQUEST, first_token_limit=0.5) as stream:
                async for _ in stream:
                    pass
    finally:
        await made.aclose()
        server.close()
    assert connects and all(line.startswith(b"CONNECT ") for line in connects)
    for error in (stuck.value, stream_stuck.value):
        assert error.error_type == "connect_timeout"
        assert (error.usage.input_tokens, error.usage.output_tokens) == (0, 0)


async def test_through_httpxs_transport_a_call_sent_is_billed_when_its_time_runs_out() -> None:
    """httpx's own transport (what a proxy needs) says through ``trace`` that the request went
    out: a time-out after it is billed as with vapora's transport."""
    import httpx

    late = await _timed_out_unanswered(httpx.AsyncHTTPTransport())
    assert late.error_type == "timeout"
    assert late.usage == upper_bound_usage(REQUEST)


async def test_a_stream_cancelled_before_it_went_out_is_billed_nothing() -> None:
    """A caller's cancel of a stream still waiting for a pooled connection billed its input."""
    import anyio

    server = await asyncio.start_server(_silent, "127.0.0.1", 0)
    made = _at(server.sockets[0].getsockname()[1], "openai", 5.0, max_connections=1)
    busy = asyncio.ensure_future(made.complete(REQUEST))
    try:
        await asyncio.sleep(0.1)  # the one connection is the first call's
        async with made.stream(REQUEST) as stream:
            with anyio.move_on_after(0.3):  # the caller's cancel
                async for _ in stream:
                    pass
            cancelled = stream.cancelled()
    finally:
        busy.cancel()
        await made.aclose()
        server.close()
    assert (cancelled.usage.input_tokens, cancelled.usage.output_tokens) == (0, 0)


async def test_a_providers_error_type_that_is_vaporas_own_is_not_taken() -> None:
    """A provider's error body naming ``cancelled_by_caller`` passed for the caller's cancel:
    the router spared its spans and the metrics counted a cancel."""
    body = msgspec.json.encode({"error": {"type": "cancelled_by_caller", "message": "no"}})
    failed = await _complete_failure("openai", answer("500 Internal Server Error", body))
    assert failed.error_type is None and failed.http_status == 500


# --- the third review's cases --------------------------------------------------------------------

_SLOW_EVENTS = [
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hello "}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"world"}}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":900,"completion_tokens":30}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_a_slow_stream_labelled_json_is_read_as_it_comes() -> None:
    """An SSE stream labelled JSON was read whole before its first chunk: one longer than its
    time to a first token timed out (billed its input, no output) though the provider
    streamed, and the router paid another. Its first read says it is a stream."""
    server = await _chunked_server(b"application/json", _SLOW_EVENTS, 0.2)
    try:
        port = server.sockets[0].getsockname()[1]
        text, done = await _streamed("openai", port, first_token_limit=0.5)
    finally:
        server.close()
    assert text == "hello world" and done.usage.output_tokens == 30


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b'"overloaded"', b"<html>502</html>"])
async def test_a_stream_labelled_json_that_is_neither_a_stream_nor_an_object_bills_nothing(
    body: bytes,
) -> None:
    """Read as a stream, such a body was "ended before its final event" and billed the input
    bound (and the output limit for a model that may reason), for a call the provider never
    answered."""
    failed = await _stream_outcome("openai", answer("200 OK", body))
    assert failed.error_type == "malformed_response" and failed.fallback
    assert (failed.usage.input_tokens, failed.usage.output_tokens) == (0, 0)


async def test_a_transport_that_does_not_say_when_it_sends_is_taken_as_having_sent() -> None:
    """A transport wrapping vapora's (a library user's, for logging) never said the request
    went out: a call timed out waiting for its answer was billed $0."""
    import httpx

    from vapora.providers import KeepAliveTransport

    class Wrapped(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = KeepAliveTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    late = await _timed_out_unanswered(Wrapped())
    assert late.error_type == "timeout"
    assert late.usage == upper_bound_usage(REQUEST)


# --- the fourth review's cases ------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces",
    [
        [b"\n", _SSE],
        [b"\r\n", _SSE],
        [b"da", _SSE[2:]],
        [b"\xef\xbb\xbf" + _SSE],
        [b": keep-alive\n\n", _SSE],
    ],
    ids=["newline alone", "crlf alone", "da", "bom", "comment"],
)
async def test_a_stream_labelled_json_is_known_by_its_first_significant_byte(
    pieces: list[bytes],
) -> None:
    """A first read of a newline alone, or of ``da``, failed the check for a stream: the whole
    stream was read as a JSON body, was none, and was recorded at $0 (the router paid another
    provider)."""
    server = await _chunked_server(b"application/json", pieces, 0.05)
    try:
        text, done = await _streamed("openai", server.sockets[0].getsockname()[1])
    finally:
        server.close()
    assert text == "hello world"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (900, 30)


async def test_a_stream_sent_whole_as_a_json_array_is_read_as_that_stream() -> None:
    """Gemini's stream without ``alt=sse`` is a JSON array of its events (a proxy that dropped
    the parameter): it was billed nothing, then (a first fix) its last stated count, a running
    one taken as final. Its events are read as the stream's would be."""
    chunks = [
        {
            "candidates": [{"content": {"parts": [{"text": "hel"}]}}],
            "usageMetadata": {"promptTokenCount": 900, "candidatesTokenCount": 1},
        },
        {
            "candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 900, "candidatesTokenCount": 30},
        },
    ]
    body = answer("200 OK", msgspec.json.encode(chunks))
    text, done = await _stub_streamed("gemini", body, model="gemini-2.0-flash")
    assert text == "hello"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (900, 30)
    # Cut after a running count (no final chunk): the count is a running one, as in SSE.
    cut = answer("200 OK", msgspec.json.encode([*chunks[:1], {"candidates": []}]))
    failed = await _stream_outcome("gemini", cut)
    assert failed.usage.output_tokens > 1


def test_a_hold_reaches_the_tiers_an_input_count_taken_as_given_reaches() -> None:
    """A count within the template allowance is taken as given: one that crossed a long-context
    tier the input bound did not reach settled at 1.9 times its hold."""
    from decimal import Decimal

    from events.contract import Price, PriceTier, Usage
    from vapora.pricing import cost, upper_bound_cost

    price = Price(
        input_per_mtok=Decimal("1.25"),
        output_per_mtok=Decimal("10"),
        cache_read_per_mtok=Decimal("0.31"),
        cache_write_per_mtok=Decimal("1.25"),
        source="test",
        version="1",
        tiers=(
            PriceTier(
                above_input_tokens=200_000,
                input_per_mtok=Decimal("2.5"),
                output_per_mtok=Decimal("15"),
                cache_read_per_mtok=Decimal("0.625"),
                cache_write_per_mtok=Decimal("2.5"),
            ),
        ),
    )
    bound, limit = 199_000, 4_000
    held = upper_bound_cost(bound, limit, price)
    taken = Usage(input_tokens=bound + INPUT_TEMPLATE_ALLOWANCE, output_tokens=limit)
    assert cost(taken, price) <= held * Decimal("1.03")  # only the allowance's own tokens past


# --- the sixth review's cases -------------------------------------------------------------------


async def test_a_json_array_stream_is_read_as_it_comes() -> None:
    """Gemini sends its array form progressively: it was read whole, so no text came before
    its end, a long answer hit its time to a first token, and it was billed its upper bound
    while the router paid another provider."""
    pieces = [b"[", _gemini_chunk("hel", 1), b",\r\n", _gemini_chunk("lo", 30, True), b"]"]
    server = await _chunked_server(b"application/json", pieces, 0.3)
    try:
        port = server.sockets[0].getsockname()[1]
        text, done = await _streamed(
            "gemini", port, model="gemini-2.0-flash", first_token_limit=0.5
        )
    finally:
        server.close()
    assert text == "hello" and done.usage.output_tokens == 30


async def test_a_json_array_with_items_that_are_no_events_keeps_its_events() -> None:
    """An array with a ``null`` (or any item that is no object) was recorded at $0."""
    body = b"[" + _gemini_chunk("hello", 30, True) + b', null, "x", []]'
    text, done = await _stub_streamed("gemini", answer("200 OK", body), model="gemini-2.0-flash")
    assert text == "hello" and done.usage.output_tokens == 30


async def test_a_json_array_cut_short_is_billed_what_it_made() -> None:
    """An array ended by its connection's close, cut in its second event: $0 (it failed to
    decode whole); it is the stream it was, cut: billed what it made (its running count)."""
    second = _gemini_chunk("lo", 30, True)
    body = b"[" + _gemini_chunk("hel", 3) + b"," + second[: len(second) // 2]
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + body
    failed = await _stream_outcome("gemini", response)
    assert failed.usage.input_tokens == 900 and failed.usage.output_tokens >= 3


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 308 Permanent Redirect\r\nlocation: https://x/\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 301 Moved\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nMoved",
    ],
    ids=["308", "301"],
)
async def test_a_redirect_is_a_configuration_error_and_bills_nothing(response: bytes) -> None:
    """A redirect (a base URL moved to https, or to another path) was taken as the provider's
    answer: billed its input bound, or its upper bound for a model that may reason."""
    for kind in ("stream", "complete"):
        async with stub(response) as port:
            made = client("openai", port, model="gpt-5")
            try:
                with pytest.raises(ProviderError) as raised:
                    if kind == "stream":
                        async with made.stream(REQUEST) as stream:
                            async for _ in stream:
                                pass
                    else:
                        await made.complete(REQUEST)
            finally:
                await made.aclose()
        assert raised.value.error_class == "configuration", kind
        assert (raised.value.usage.input_tokens, raised.value.usage.output_tokens) == (0, 0)


# --- the seventh review's cases -----------------------------------------------------------------


@pytest.mark.parametrize("indent", [b"\n  ", b"\r\n", b"\t\n\n"], ids=["indent", "crlf", "blank"])
async def test_a_pretty_printed_json_array_stream_is_read_whole_event_by_event(
    indent: bytes,
) -> None:
    """Google's APIs pretty-print JSON unless told otherwise: the whitespace inside an item was
    kept, the SSE reader split the event at its first newline, and the answer's output was
    recorded as 0."""
    first = msgspec.json.format(_gemini_chunk("hel", 1), indent=2).replace(b"\n", indent)
    last = msgspec.json.format(_gemini_chunk("lo", 30, True), indent=2).replace(b"\n", indent)
    body = b"[" + indent + first + indent + b"," + indent + last + indent + b"]"
    text, done = await _stub_streamed("gemini", answer("200 OK", body), model="gemini-2.0-flash")
    assert text == "hello" and done.usage.output_tokens == 30


async def test_nothing_after_a_json_array_streams_end_is_read() -> None:
    """A second array after the first's ``]`` (a broken proxy) reopened it: its usage replaced
    the answer's."""
    body = (
        b"[" + _gemini_chunk("hello", 30, True) + b"]"
        + b"[" + _gemini_chunk("x", 2500, True) + b"]"
    )  # fmt: skip
    text, done = await _stub_streamed("gemini", answer("200 OK", body), model="gemini-2.0-flash")
    assert text == "hello" and done.usage.output_tokens == 30


async def test_a_json_array_streams_first_event_too_long_is_still_an_answer() -> None:
    """A first event past the frame limit was billed $0 (the same event over SSE, its input)."""
    huge = b'[{"candidates": [{"content": {"parts": [{"text": "' + b"x" * (2 << 20) + b'"}]}}]}]'
    failed = await _stream_outcome("gemini", answer("200 OK", huge))
    assert failed.error_type == "malformed_response"
    assert failed.usage.input_tokens == input_token_bound(REQUEST)


async def test_a_redirect_whose_body_stalls_past_the_time_limit_bills_nothing() -> None:
    """A refusal (a redirect, a 429 ...) whose body stalled past the time limit was billed as a
    call that went out and timed out: its upper bound."""

    head = b"HTTP/1.1 302 Found\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    server = await asyncio.start_server(_stalling_after(head), "127.0.0.1", 0)
    made = _at(server.sockets[0].getsockname()[1], "openai", 0.5)
    try:
        with pytest.raises(ProviderError) as raised:
            await made.complete(REQUEST)
    finally:
        await made.aclose()
        server.close()
    assert (raised.value.usage.input_tokens, raised.value.usage.output_tokens) == (0, 0)


# --- the eighth review's cases ------------------------------------------------------------------


async def test_a_refusal_cancelled_by_its_caller_while_its_body_stalls_bills_nothing() -> None:
    """A caller's cancel during a 429's stalled body recorded the refusal as spend (its input
    bound; its whole upper bound for a model that may reason)."""
    import anyio

    head = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n{"
    )
    server = await asyncio.start_server(_stalling_after(head), "127.0.0.1", 0)
    made = _at(server.sockets[0].getsockname()[1], "openai", 5.0)
    try:
        async with made.stream(REQUEST) as stream:
            with anyio.move_on_after(0.3):  # the caller's cancel
                async for _ in stream:
                    pass
            cancelled = stream.cancelled()
    finally:
        await made.aclose()
        server.close()
    assert (cancelled.usage.input_tokens, cancelled.usage.output_tokens) == (0, 0)


async def test_an_empty_json_array_is_no_answer_however_long_its_body_stays_open() -> None:
    """``[]`` whose body never ended waited out the time limit, then was billed its upper
    bound."""
    server = await _chunked_server(b"application/json", [b"[]", b"\n"], 5.0)
    made = client("gemini", server.sockets[0].getsockname()[1], model="gemini-2.5-flash")
    try:
        with pytest.raises(ProviderError) as raised:
            async with made.stream(REQUEST, first_token_limit=2.0) as stream:
                async for _ in stream:
                    pass
    finally:
        await made.aclose()
        server.close()
    assert raised.value.error_type == "malformed_response"
    assert (raised.value.usage.input_tokens, raised.value.usage.output_tokens) == (0, 0)


async def test_an_event_past_the_frame_limit_is_output_the_answer_holds() -> None:
    """An event past 1 MiB after the first was billed by the text before it (3 tokens): that
    long an event is output the answer holds, unread (an image part, say)."""
    big = b'{"candidates": [{"content": {"parts": [{"text": "' + b"x" * (2 << 20) + b'"}]}}]}'
    body = b"data: " + _gemini_chunk("hel", 3) + b"\n\ndata: " + big + b"\n\n"
    response = answer("200 OK", body, "content-type: text/event-stream\r\n")
    failed = await _stream_outcome("gemini", response)
    assert failed.usage.output_tokens == REQUEST.output_limit
