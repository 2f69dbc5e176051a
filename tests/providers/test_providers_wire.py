"""SSE and NDJSON framing, and rate-limit waits from headers: pure functions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vapora.providers.wire import (
    Frame,
    ndjson_frames,
    parse_duration,
    retry_after_from_headers,
    sse_frames,
)

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(set(cuts)):
        yield data[start:cut]
        start = cut
    yield data[start:]


def _frames(parser, data: bytes, cuts: list[int]) -> list[Frame]:  # type: ignore[no-untyped-def]
    async def collect() -> list[Frame]:
        return [frame async for frame in parser(_chunks(data, cuts))]

    # The parsers await only their input, which never suspends here: drive the coroutine by
    # hand, so these hypothesis tests need no event loop (a session-scoped async fixture may
    # already be running one in this thread).
    coroutine = collect()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the parser waited on something other than its input")


SSE = (
    b'event: message_start\ndata: {"a": 1}\n\n'
    b": a comment line\n\n"
    b'event: ping\r\ndata: {"type": "ping"}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b"data: [DONE]\n\n"
)
SSE_FRAMES = [
    Frame("message_start", b'{"a": 1}'),
    Frame("ping", b'{"type": "ping"}'),
    Frame("", b"line one\nline two"),
    Frame("", b"[DONE]"),
]


def test_sse_events_with_names_comments_crlf_and_multiline_data() -> None:
    assert _frames(sse_frames, SSE, []) == SSE_FRAMES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(SSE)), max_size=8))
def test_sse_framing_does_not_depend_on_how_bytes_arrive(cuts: list[int]) -> None:
    assert _frames(sse_frames, SSE, cuts) == SSE_FRAMES


# Runs of blank lines between events, a data-less event, an unnamed event after a named one.
SSE_SPACED = b"data: a\n\n\n\nevent: x\n\n\n\nevent: y\ndata: b\n\n\ndata: c\n\n\n"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, len(SSE_SPACED)), max_size=8))
def test_sse_blank_line_runs_whatever_the_chunking(cuts: list[int]) -> None:
    assert _frames(sse_frames, SSE_SPACED, cuts) == [
        Frame("", b"a"),
        Frame("y", b"b"),
        Frame("", b"c"),
    ]


NDJSON = b'{"a":1}\n\n{"b":2}\r\n{"done":true}'


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(NDJSON)), max_size=6))
def test_ndjson_lines_whatever_the_chunking(cuts: list[int]) -> None:
    frames = _frames(ndjson_frames, NDJSON, cuts)
    assert [f.data for f in frames] == [b'{"a":1}', b'{"b":2}', b'{"done":true}']


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5s", 2.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5", "1s garbage"])
def test_not_durations(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "Thu, 26 Nov 2026 12:00:30 GMT"}, 30.0),
        ({"retry-after": "Thu, 26 Nov 2026 11:59:00 GMT"}, 0.0),  # already past: no wait
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "2026-11-26T12:00:20Z",
                "anthropic-ratelimit-tokens-remaining": "5000",
                "anthropic-ratelimit-tokens-reset": "2026-11-26T12:00:50Z",
            },
            20.0,  # the exhausted limit, not the later one that still has room
        ),
        (
            {
                "x-ratelimit-remaining-requests": "10",
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            360.0,
        ),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "1s"}, 1.0),
        ({}, None),
        ({"retry-after": "whenever"}, None),
    ],
)
def test_rate_limit_waits(headers: dict[str, str], wait: float | None) -> None:
    assert retry_after_from_headers(headers, NOW) == wait
