"""Answers from a provider that are not what they should be, from stub servers over real HTTP:
a 200 that is no answer, counts the answer left out, an error whose body was cut, an in-stream
error's class. Each was billed, classified or retried wrongly."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from decimal import Decimal

import anyio
import msgspec
import pytest

from events.contract import Price
from tests.providers.conftest import price_of, stub
from vapora.errors import (
    ProviderContextOverflow,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
)
from vapora.pricing import _table_price, cost
from vapora.providers import (
    Completion,
    ProviderClient,
    ProviderRequest,
    StreamBroken,
    make_client,
)

pytestmark = pytest.mark.anyio

MODELS = {
    "anthropic": "claude-sonnet-4-6",
    "openai": "gpt-4o",
    "gemini": "gemini-2.5-flash",
    "ollama": "llama3.2",
}


def client(kind: str, port: int, model: str | None = None) -> ProviderClient:
    return make_client(
        name=kind,
        kind=kind,
        model=model or MODELS[kind],
        price=price_of(kind),
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else ""),
        timeout=5.0,
    )


def answer(status: str, body: bytes, headers: str = "content-type: application/json\r\n") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\n{headers}content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


async def complete(kind: str, response: bytes) -> object:
    async with stub(response) as port:
        made = client(kind, port)
        try:
            return await made.complete(ProviderRequest(prompt="a b c d", max_tokens=50))
        except ProviderError as error:
            return error
        finally:
            await made.aclose()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("body", [b"{}", b'{"error": {"message": "overloaded", "type": "x"}}'])
async def test_a_200_that_is_no_answer_is_a_transient_failure(kind: str, body: bytes) -> None:
    """It was a success with empty text, billed an estimate, and the router did not fall back."""
    outcome = await complete(kind, answer("200 OK", body))
    assert isinstance(outcome, ProviderUnavailable), outcome
    assert outcome.fallback


async def test_an_output_count_left_out_is_estimated_not_billed_as_zero() -> None:
    body = msgspec.json.encode(
        {
            "id": "chatcmpl-1",
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "one two three"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10},
        }
    )
    done = await complete("openai", answer("200 OK", body))
    assert not isinstance(done, ProviderError)
    assert done.usage_estimated and done.usage.output_tokens > 0  # type: ignore[attr-defined]


async def test_gemini_usage_without_its_candidate_count_is_estimated() -> None:
    body = msgspec.json.encode(
        {
            "candidates": [
                {"content": {"parts": [{"text": "one two three"}]}, "finishReason": "STOP"}
            ],
            "usageMetadata": {"promptTokenCount": 10},
        }
    )
    done = await complete("gemini", answer("200 OK", body))
    assert not isinstance(done, ProviderError)
    assert done.usage_estimated and done.usage.output_tokens > 0  # type: ignore[attr-defined]


def cut(status: str, headers: str = "") -> bytes:
    """An error answer whose body ends 40 bytes short of its content-length."""
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}"
        "content-length: 60\r\n\r\n"
    ).encode() + b'{"error": {"message": '


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_an_error_whose_body_was_cut_keeps_its_status(kind: str) -> None:
    """A cut body made every error a transient "connection" failure: a caller error fell back
    to the next provider, and a 429 lost its wait."""
    rejected = await complete(kind, cut("400 Bad Request"))
    assert isinstance(rejected, ProviderRejected) and not rejected.fallback
    limited = await complete(kind, cut("429 Too Many Requests", "retry-after: 7\r\n"))
    assert isinstance(limited, ProviderRateLimited) and limited.retry_after == 7


#: A prompt long enough for the counts these answers report (a count past what the request
#: could be billed for is not taken: Turn.usage).
_LONG_PROMPT = "a b c d " * 8_000


async def _stream_failure(kind: str, response: bytes, prompt: str = "a b c d") -> ProviderError:
    """The error a ``kind`` client's stream raises on ``response``, served once."""
    async with stub(response) as port:
        made = client(kind, port)
        try:
            with pytest.raises(ProviderError) as raised:
                async with made.stream(ProviderRequest(prompt=prompt)) as stream:
                    async for _ in stream:
                        pass
        finally:
            await made.aclose()
    return raised.value


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            {"type": "invalid_request_error", "code": "context_length_exceeded"},
            ProviderContextOverflow,
        ),
        ({"type": "invalid_request_error", "code": "invalid_value"}, ProviderRejected),
        ({"type": "requests", "code": "rate_limit_exceeded"}, ProviderRateLimited),
        ({"type": "server_error", "code": None}, ProviderUnavailable),
    ],
)
async def test_an_openai_in_stream_error_is_classified_by_its_code(
    error: dict[str, object], expected: type[ProviderError]
) -> None:
    frame = b"data: " + msgspec.json.encode({"error": {"message": "no", **error}}) + b"\n\n"
    response = answer("200 OK", frame, "content-type: text/event-stream\r\n")
    failed = await _stream_failure("openai", response)
    assert type(failed) is expected


_START = (
    b"event: message_start\ndata: "
    + msgspec.json.encode(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-6",
                "content": [],
                "usage": {"input_tokens": 50000, "output_tokens": 1},
            },
        }
    )
    + b"\n\n"
)
_ERROR = (
    b"event: error\ndata: "
    + msgspec.json.encode({"type": "error", "error": {"type": "overloaded_error", "message": "x"}})
    + b"\n\n"
)


@pytest.mark.parametrize(
    "response",
    [
        answer("200 OK", _START + _ERROR, "content-type: text/event-stream\r\n"),
        # cut after the start: the content-length promises more than is sent
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 5000\r\n\r\n"
        + _START,
    ],
    ids=["error event", "cut"],
)
async def test_input_reported_before_a_stream_fails_is_billed(response: bytes) -> None:
    """The provider counted 50,000 input tokens in ``message_start``; the stream failed before
    its first chunk, and the failure carried no usage, so none of it was recorded."""
    failed = await _stream_failure("anthropic", response, _LONG_PROMPT)
    assert failed.fallback  # still before the first chunk: the router falls back
    assert failed.usage.input_tokens == 50000


_OPENAI_STREAM = (
    b"".join(
        b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        for chunk in (
            {"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {
                "id": "c",
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            },
            {
                "id": "c",
                "model": "gpt-4o",
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": 1},
            },
        )
    )
    + b"data: [DONE]\n\n"
)


async def test_a_time_limit_firing_in_the_grace_after_the_final_event_ends_nothing() -> None:
    """The grace runs inside the call's time limit: a limit that fired there turned the whole
    answer into a broken stream."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100000\r\n\r\n"
    async with stub(head + _OPENAI_STREAM, hold_s=30) as port:
        made = client("openai", port)
        try:
            async with made.stream(ProviderRequest(prompt="a b c d"), time_limit=1) as stream:
                async for _ in stream:
                    pass
        finally:
            await made.aclose()
    assert stream.completion is not None and stream.completion.text == "hi"
    assert stream.completion.usage.output_tokens == 1


async def test_a_stream_whose_body_never_ends_after_its_final_event_completes() -> None:
    """The answer was whole ([DONE] and the usage read) but the server kept the body open: the
    client waited the call's whole time limit and reported the answer as a broken stream."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100000\r\n\r\n"
    async with stub(head + _OPENAI_STREAM, hold_s=30) as port:
        made = client("openai", port)
        started = anyio.current_time()
        try:
            async with made.stream(ProviderRequest(prompt="a b c d"), time_limit=20) as stream:
                texts = [text async for text in stream]
        finally:
            await made.aclose()
    assert texts == ["hi"] and stream.completion is not None
    assert (stream.completion.usage.input_tokens, stream.completion.usage.output_tokens) == (7, 1)
    assert anyio.current_time() - started < 10  # the grace (2 s), not the time limit (20 s)


def _frames(*chunks: dict[str, object]) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(chunk) + b"\n\n" for chunk in chunks)


_TEXT = {"id": "c", "choices": [{"index": 0, "delta": {"content": "one two three"}}]}
_STOP = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
# Three tokens for the text's 13 bytes: less than its bound, as real counts are.
_USAGE = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
# A body longer than what is sent: the server closes it early (a cut).
_CUT_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 100000\r\n\r\n"
REQUEST_100 = ProviderRequest(prompt="a b c d", max_tokens=100)


async def _cut_stream(body: bytes, model: str) -> tuple[list[str], StreamBroken | None, object]:
    async with stub(_CUT_HEAD + body) as port:
        made = client("openai", port, model)
        texts: list[str] = []
        try:
            async with made.stream(REQUEST_100, time_limit=5) as stream:
                async for text in stream:
                    texts.append(text)
        except StreamBroken as broken:
            return texts, broken, None
        finally:
            await made.aclose()
    return texts, None, stream.completion


@pytest.mark.parametrize("model", ["gpt-4o", "o4-mini"])
async def test_a_stream_cut_after_its_usage_keeps_the_count_the_provider_gave(model: str) -> None:
    """The usage chunk (the answer's last count) came, then the body broke before ``[DONE]``:
    the count stands, for a reasoner too (a review found it replaced by the output limit)."""
    texts, broken, _ = await _cut_stream(_frames(_TEXT, _STOP, _USAGE), model)

    assert texts == ["one two three"] and broken is not None
    assert (broken.usage.input_tokens, broken.usage.output_tokens) == (7, 3)
    assert broken.usage_estimated is False  # the provider's own counts


async def test_a_stream_cut_after_its_final_event_is_a_whole_answer() -> None:
    """``[DONE]`` came, then the connection broke instead of the body ending: the answer was
    whole, and is not a broken stream."""
    texts, broken, completion = await _cut_stream(
        _frames(_TEXT, _STOP, _USAGE) + b"data: [DONE]\n\n", "gpt-4o"
    )

    assert broken is None and texts == ["one two three"]
    assert completion is not None and completion.usage.output_tokens == 3  # type: ignore[attr-defined]


async def test_a_running_count_in_every_chunk_is_not_taken_as_the_last_on_a_cut() -> None:
    """An OpenAI-compatible server that sends usage with every chunk (vLLM's
    ``continuous_usage_stats``): a count before the finish is a running one; cut then, the
    output is bounded (its text's bound, 13) as if none had come, not the 1 so far."""
    running = {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": "one two three"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1},
    }
    _, broken, _ = await _cut_stream(_frames(running), "house-model-7b")

    assert broken is not None
    assert (broken.usage.input_tokens, broken.usage.output_tokens) == (7, 13)
    assert broken.usage_estimated is True  # a bound: the GenAI token metric leaves it out


async def test_a_frame_begun_after_the_final_event_and_cut_leaves_the_answer_whole() -> None:
    texts, broken, completion = await _cut_stream(
        _frames(_TEXT, _STOP, _USAGE) + b'data: [DONE]\n\ndata: {"id', "gpt-4o"
    )

    assert broken is None and texts == ["one two three"] and completion is not None


async def test_reasoning_text_in_the_deltas_bounds_a_cut_stream_whatever_the_models_name() -> None:
    """An OpenAI-compatible server that streams reasoning (``reasoning_content``) bills it as
    output: cut before its usage, the count is bounded by the output limit though the model's
    name says nothing; the same cut without reasoning is bounded by its text."""
    thinking = {"id": "c", "choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    _, reasoned, _ = await _cut_stream(_frames(thinking, _TEXT), "house-model-7b")
    _, plain, _ = await _cut_stream(_frames(_TEXT), "house-model-7b")

    assert reasoned is not None and reasoned.usage.output_tokens == 100
    assert plain is not None and plain.usage.output_tokens == len("one two three")


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_an_event_that_never_ends_is_malformed_not_buffered_for_ever(kind: str) -> None:
    """Each read searched the whole pending event again: 32 MB of one event blocked the loop
    for seconds. Past 1 MiB it is a malformed answer (transient: the router falls back)."""
    start = b"data: " if kind == "openai" else b""
    body = start + b"x" * (3 << 20)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    # The server goes on sending (its body is longer than what it sent so far).
    response = head + b"content-length: %d\r\n\r\n" % (2 * len(body)) + body
    async with stub(response, hold_s=30) as port:
        made = client(kind, port)
        try:
            with pytest.raises(ProviderUnavailable, match="malformed"):
                request = ProviderRequest(prompt="a b c d")
                async with made.stream(request, time_limit=20) as stream:
                    async for _ in stream:
                        pass
        finally:
            await made.aclose()


async def test_gemini_thinking_tokens_do_not_stand_for_a_left_out_candidates_count() -> None:
    """With only ``thoughtsTokenCount`` reported, the output was the thinking tokens alone:
    the text itself was billed nothing."""
    text = "word " * 300
    body = msgspec.json.encode(
        {
            "candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "thoughtsTokenCount": 20},
        }
    )
    done = await complete("gemini", answer("200 OK", body))
    assert not isinstance(done, ProviderError)
    assert done.usage_estimated  # type: ignore[attr-defined]
    # The text's bound with the thinking, up to the request's limit of 50: not the 20 alone.
    assert done.usage.output_tokens == 50  # type: ignore[attr-defined]


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(
    ("response", "output"),
    [
        # A safety stop before any text: Gemini leaves the zero candidates count out.
        (
            {
                "candidates": [{"finishReason": "SAFETY"}],
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            },
            0,
        ),
        # A prompt it blocked, with no total either.
        (
            {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}},
            0,
        ),
        # The limit reached while thinking: the thinking is the whole output.
        (
            {
                "candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}],
                "usageMetadata": {
                    "promptTokenCount": 9,
                    "thoughtsTokenCount": 40,
                    "totalTokenCount": 49,
                },
            },
            40,
        ),
        # Text, and a total that would leave the candidates' count: not taken (a count left
        # out of an answer with text is not a zero; the total may be a running one), bounded.
        (
            {
                "candidates": [
                    {"content": {"parts": [{"text": "one two"}]}, "finishReason": "STOP"}
                ],
                "usageMetadata": {
                    "promptTokenCount": 9,
                    "thoughtsTokenCount": 4,
                    "totalTokenCount": 15,
                },
            },
            -11,  # its text's bound (7 bytes) and the thinking
        ),
        # A candidate with no text and no total: nothing says how much it thought, bounded.
        (
            {
                "candidates": [{"finishReason": "MAX_TOKENS"}],
                "usageMetadata": {"promptTokenCount": 9},
            },
            -50,  # the output limit: a model that may think
        ),
    ],
    ids=["safety", "blocked", "thinking", "text-and-total", "no-total"],
)
async def test_a_finished_gemini_answer_missing_its_zero_candidates_count_is_not_bounded(
    response: dict[str, object], output: int, streamed: bool
) -> None:
    """Gemini's JSON leaves zero counts out: a finished answer that made no text has no
    ``candidatesTokenCount``. For a model that may think (2.5 and later) it was billed its
    whole output limit (50 here; $0.04 instead of $0.0001 at 4,096 on Gemini 2.5 Pro)."""
    body = msgspec.json.encode(response)
    if streamed:
        frame = b"data: " + body + b"\r\n\r\n"
        async with stub(answer("200 OK", frame, "content-type: text/event-stream\r\n")) as port:
            made = client("gemini", port)
            try:
                request = ProviderRequest(prompt="a b c d", max_tokens=50)
                async with made.stream(request) as stream:
                    _ = [text async for text in stream]
            finally:
                await made.aclose()
        done: object = stream.completion
    else:
        done = await complete("gemini", answer("200 OK", body))
    assert isinstance(done, Completion)
    # A negative ``output``: not known, so bounded at that (and flagged as estimated).
    assert (done.usage.input_tokens, done.usage.output_tokens) == (9, abs(output))
    assert done.usage_estimated is (output < 0)


async def test_a_blocked_gemini_prompt_ends_the_same_streamed_or_not() -> None:
    """Not streamed it was a success with no finish reason; streamed, a transient failure."""
    feedback = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 9},
    }
    body = msgspec.json.encode(feedback)
    done = await complete("gemini", answer("200 OK", body))
    assert not isinstance(done, ProviderError)
    assert (done.text, done.finish_reason) == ("", "content_filter")  # type: ignore[attr-defined]
    frame = b"data: " + body + b"\r\n\r\n"
    async with stub(answer("200 OK", frame, "content-type: text/event-stream\r\n")) as port:
        made = client("gemini", port)
        try:
            async with made.stream(ProviderRequest(prompt="a b c d")) as stream:
                assert [text async for text in stream] == []
        finally:
            await made.aclose()
    assert stream.completion is not None and stream.completion.finish_reason == "content_filter"


async def test_an_error_answered_with_200_is_classified_like_the_same_error_streamed() -> None:
    """A 200 OpenAI body with ``context_length_exceeded`` was a 500 (the router fell back),
    where the same error in a stream is a caller error; ``"error": null`` was a failure."""
    error = {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    rejected = await complete("openai", answer("200 OK", msgspec.json.encode(error)))
    assert type(rejected) is ProviderContextOverflow
    fine = {
        "id": "c",
        "model": "gpt-4o",
        "error": None,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    done = await complete("openai", answer("200 OK", msgspec.json.encode(fine)))
    assert not isinstance(done, ProviderError) and done.text == "hi"  # type: ignore[attr-defined]


_ANTHROPIC_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "usage": {
            "input_tokens": 10,
            "cache_read_input_tokens": 50_000,
            "cache_creation_input_tokens": 2_000,
            "output_tokens": 1,
        },
    },
}


def _sse(events: list[dict[str, object]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@pytest.mark.parametrize(
    "delta_usage",
    [
        {"output_tokens": 20},  # the documented example
        {"input_tokens": 10, "output_tokens": 20},  # input alone: the cache counts stand
        {  # nulls (MessageDeltaUsage's counts are Optional)
            "input_tokens": None,
            "cache_read_input_tokens": None,
            "cache_creation_input_tokens": None,
            "output_tokens": 20,
        },
        {"input_tokens": 12, "cache_read_input_tokens": 49_000, "output_tokens": 20},
    ],
)
async def test_an_anthropic_streams_usage_accumulates_as_the_official_sdk_does(
    delta_usage: dict[str, object],
) -> None:
    """A ``message_delta`` carrying ``input_tokens`` without the cache counts (or nulls) reset
    them to 0: 50,000 cache reads and 2,000 writes went unbilled."""
    from anthropic._models import construct_type
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    events = [
        _ANTHROPIC_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": delta_usage,
        },
        {"type": "message_stop"},
    ]
    snapshot = None
    for event in events:
        parsed = construct_type(type_=RawMessageStreamEvent, value=event)
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs={})
    assert snapshot is not None
    sdk = snapshot.usage
    body = _sse(events)
    head = answer("200 OK", body, headers="content-type: text/event-stream\r\n")
    async with stub(head) as port:
        made = client("anthropic", port)
        try:
            async with made.stream(ProviderRequest(prompt=_LONG_PROMPT)) as stream:
                async for _ in stream:
                    pass
        finally:
            await made.aclose()
    usage = stream.completion.usage
    read, write = sdk.cache_read_input_tokens or 0, sdk.cache_creation_input_tokens or 0
    assert (usage.cache_read_tokens, usage.cache_write_tokens) == (read, write)
    assert usage.input_tokens == sdk.input_tokens + read + write  # ours include the cache
    assert usage.output_tokens == sdk.output_tokens == 20
    assert not stream.completion.usage_estimated


async def test_a_stream_its_caller_abandons_keeps_what_was_billed_so_far() -> None:
    """Forwarding a chunk failed (NATS closed, its buffer full): the provider actor recorded an
    internal failure with no usage, though the provider had counted 20,000 input tokens."""
    from vapora.providers.stream import FORWARD_FAILED
    from vapora.providers.values import StreamBroken

    start = {**_ANTHROPIC_START}
    start["message"] = {**_ANTHROPIC_START["message"], "usage": {"input_tokens": 20_000}}  # type: ignore[dict-item]
    words = [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "w "}}
    ] * 50
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 50},
    }
    head = answer(
        "200 OK", _sse([start, *words, end]), headers="content-type: text/event-stream\r\n"
    )
    async with stub(head) as port:
        made = client("anthropic", port)
        try:
            with pytest.raises(StreamBroken) as raised:
                async with made.stream(ProviderRequest(prompt=_LONG_PROMPT)) as stream:
                    forwarded = 0
                    async for _ in stream:
                        forwarded += 1
                        if forwarded == 3:
                            raise stream.abandoned(ConnectionError("nats: connection closed"))
        finally:
            await made.aclose()
    broken = raised.value
    assert broken.error_type == FORWARD_FAILED and broken.partial_text == "w w w "
    assert broken.usage.input_tokens == 20_000  # reported by message_start: billed
    assert broken.usage.output_tokens >= 3  # estimated from the text received


# JSON nested past what msgspec decodes: it raises RecursionError, not a DecodeError.
_DEEP = b"[" * 3000 + b"]" * 3000
_FIRST_TEXT = {
    "anthropic": b"event: message_start\ndata: "
    + msgspec.json.encode(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-6",
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": 1000, "output_tokens": 1},
            },
        }
    )
    + b"\n\nevent: content_block_delta\ndata: "
    + msgspec.json.encode(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
    )
    + b"\n\n",
    "openai": b"data: "
    + msgspec.json.encode(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        }
    )
    + b"\n\n",
    "gemini": b"data: "
    + msgspec.json.encode({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]})
    + b"\n\n",
    "ollama": msgspec.json.encode(
        {"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": False}
    )
    + b"\n",
}


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini", "ollama"])
async def test_json_nested_too_deep_is_a_malformed_answer_not_a_crash(kind: str) -> None:
    """A frame msgspec cannot decode for its depth escaped the clients as RecursionError, which
    the provider actor recorded as its own bug (billing unknown) and the router took as a reason
    to fall back, after the stream's first chunks had reached the caller."""
    deep = _DEEP + b"\n" if kind == "ollama" else b"data: " + _DEEP + b"\n\n"
    kind_header = "application/x-ndjson" if kind == "ollama" else "text/event-stream"
    body = _FIRST_TEXT[kind] + deep
    response = answer("200 OK", body, f"content-type: {kind_header}\r\n")
    texts: list[str] = []
    async with stub(response) as port:
        made = client(kind, port)
        try:
            with pytest.raises(ProviderError) as raised:
                async with made.stream(ProviderRequest(prompt="a b c d")) as stream:
                    async for text in stream:
                        texts.append(text)
        finally:
            await made.aclose()
    assert texts == ["Hi"]
    assert raised.value.error_class == "stream_broken"
    assert "malformed" in raised.value.message

    # The same depth as a whole answer: a malformed answer (the router falls back, nothing
    # billed for an answer that is not one), and as an error body: classified by its status.
    whole = await complete(kind, answer("200 OK", _DEEP))
    assert type(whole) is ProviderUnavailable and "malformed" in whole.message
    refused = await complete(kind, answer("400 Bad Request", _DEEP))
    assert type(refused) is ProviderRejected


def _gpt5_price() -> Price:
    """gpt-5's standard price from the genai-prices table (which has its service tiers)."""
    price = _table_price("openai", "gpt-5", datetime.now(UTC))
    assert price is not None
    return price


def _gpt5(port: int, price: Price) -> ProviderClient:
    return make_client(
        name="openai", kind="openai", model="gpt-5", price=price, api_key="sk-test",
        base_url=f"http://127.0.0.1:{port}/v1", timeout=5.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tier", "factor"), [("default", 1), ("priority", 2), ("flex", Decimal("0.5"))]
)
async def test_an_openai_call_is_priced_at_the_service_tier_it_was_served_at(
    tier: str, factor: Decimal
) -> None:
    """A request that names no ``service_tier`` is served at the project's default, which may
    be priority (about twice the standard rates) or flex (half): the response says which, and
    it was recorded at the standard rates whatever it said."""
    standard = _gpt5_price()
    body = msgspec.json.encode(
        {
            "id": "c",
            "model": "gpt-5",
            "service_tier": tier,
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2000, "completion_tokens": 300},
        }
    )
    async with stub(answer("200 OK", body)) as port:
        made = _gpt5(port, standard)
        try:
            done = await made.complete(ProviderRequest(prompt="a b c d", max_tokens=400))
        finally:
            await made.aclose()
    assert done.cost_usd == cost(done.usage, standard) * factor
    assert done.price.source == (
        "genai-prices" if tier == "default" else f"genai-prices service_tier={tier}"
    )


async def test_a_streamed_openai_call_is_priced_at_the_service_tier_its_chunks_name() -> None:
    standard = _gpt5_price()
    tier = {"id": "c", "service_tier": "priority"}
    chunks = [
        {**tier, "choices": [{"delta": {"content": "hi"}}]},
        {**tier, "choices": [{"delta": {}, "finish_reason": "stop"}]},
        {**tier, "choices": [], "usage": {"prompt_tokens": 2000, "completion_tokens": 300}},
    ]
    frames = b"".join(b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks)
    frames += b"data: [DONE]\n\n"
    async with stub(answer("200 OK", frames, "content-type: text/event-stream\r\n")) as port:
        made = _gpt5(port, standard)
        try:
            async with made.stream(ProviderRequest(prompt="a b c d", max_tokens=400)) as stream:
                assert [t async for t in stream] == ["hi"]
        finally:
            await made.aclose()
    done = stream.completion
    assert done is not None and done.cost_usd == cost(done.usage, standard) * 2


async def test_a_stream_cut_after_its_service_tier_was_said_is_billed_at_that_tier() -> None:
    """Only a whole answer was priced at its tier: a stream cut after chunks that said
    ``priority`` was recorded at the standard rates (half what OpenAI bills)."""
    standard = _gpt5_price()
    text = {**_TEXT, "service_tier": "priority"}
    async with stub(_CUT_HEAD + _frames(text)) as port:
        made = _gpt5(port, standard)
        try:
            with pytest.raises(StreamBroken) as broken:
                async with made.stream(REQUEST_100, time_limit=5) as stream:
                    async for _ in stream:
                        pass
        finally:
            await made.aclose()
    error = broken.value
    assert error.price is not None and error.price.source.endswith("service_tier=priority")
    assert cost(error.usage, error.price) == cost(error.usage, standard) * 2


async def test_a_service_tier_vapora_has_no_price_for_is_said_once_and_priced_as_standard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = msgspec.json.encode(
        {
            "id": "c",
            "service_tier": "scale",
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 3},
        }
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            done = await complete("openai", answer("200 OK", body))
            assert isinstance(done, Completion) and done.price == price_of("openai")
    said = [r.getMessage() for r in caplog.records if "service tier" in r.getMessage()]
    assert len(said) == 1 and "'scale'" in said[0] and "standard rates" in said[0]


def _openai(message: dict[str, object], finish: object = "stop") -> bytes:
    body = {
        "id": "chatcmpl-1",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }
    return answer("200 OK", json.dumps(body).encode())


@pytest.mark.parametrize(
    "finish", [{"nested": [1, 2]}, 12, "a b c d: the prompt quoted", "x" * 200, "stop\n"]
)
async def test_a_finish_reason_that_is_no_identifier_is_not_taken(finish: object) -> None:
    """A provider's `finish_reason` went to the call's event as it came: an object made the
    event unreadable to every reader (the audit failed from then on), and the caller had a 502
    for an answer billed; the prompt there was stored in the event log (a review)."""
    outcome = await complete("openai", _openai({"content": "hi"}, finish))
    assert isinstance(outcome, Completion), outcome
    assert outcome.text == "hi" and outcome.finish_reason is None
    assert (await complete("openai", _openai({"content": "hi"}))).finish_reason == "stop"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ([{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}], "hi there"),
        (["hi ", "there"], "hi there"),
        ([{"type": "refusal", "refusal": "no"}, {"type": "text", "text": "ok"}], "ok"),
        (None, ""),
    ],
)
async def test_content_given_as_parts_is_their_text(content: object, text: str) -> None:
    """OpenAI-compatible servers may send `content` as a list of parts: its Python repr was
    taken as the answer's text (`[{'type': 'text', ...}]`), and billed."""
    outcome = await complete("openai", _openai({"content": content}))
    assert isinstance(outcome, Completion), outcome
    assert outcome.text == text


@pytest.mark.parametrize("content", [{"a": 1}, [{"type": "text", "text": 3}], 7])
async def test_content_that_is_no_text_is_a_malformed_answer(content: object) -> None:
    outcome = await complete("openai", _openai({"content": content}))
    assert isinstance(outcome, ProviderError), outcome
    assert "{'a': 1}" not in str(outcome)


async def test_an_openai_error_whose_code_is_an_object_is_the_refusal_it_is() -> None:
    """`code` an object raised out of the classification (unhashable): a 400 refusal was an
    internal error, billed at the attempt's upper bound (a review)."""
    body = json.dumps({"error": {"message": "m", "code": {"a": 1}, "type": ["x"]}}).encode()
    outcome = await complete("openai", answer("400 Bad Request", body))
    assert isinstance(outcome, ProviderRejected), outcome
    assert outcome.usage is None or outcome.usage.output_tokens == 0


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_text_that_is_no_text_is_a_malformed_answer_from_each_provider(kind: str) -> None:
    """Gemini took a part's `text` object as its Python repr, billed; Anthropic raised a bare
    TypeError out of the client (a review)."""
    if kind == "anthropic":
        body = {
            "id": "msg_1",
            "type": "message",
            "model": "claude-sonnet-4-6",
            "content": [{"type": "text", "text": {"a": 1}}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 2},
        }
    else:
        body = {
            "candidates": [{"content": {"parts": [{"text": {"a": 1}}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2},
        }
    outcome = await complete(kind, answer("200 OK", json.dumps(body).encode()))
    assert isinstance(outcome, ProviderError), outcome
    assert "{'a': 1}" not in str(outcome)
