"""Wire-level helpers shared by the clients: SSE and NDJSON framing, rate-limit waits.

Pure functions over bytes and headers; no I/O beyond iterating the byte stream given.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import NamedTuple

__all__ = [
    "Frame",
    "NDJSONDecoder",
    "SSEDecoder",
    "ndjson_frames",
    "parse_duration",
    "retry_after_from_headers",
    "sse_frames",
]


class Frame(NamedTuple):
    """One stream frame: the SSE event name ("" when none, and for NDJSON) and its data."""

    event: str
    data: bytes


#: The longest event or line a stream may send: a provider's are a few kB; past this the
#: stream is malformed (buffering it on, each read would search it all again).
MAX_FRAME_BYTES = 1 << 20


class FrameTooLong(ValueError):
    """A stream's event or line went past :data:`MAX_FRAME_BYTES` without ending."""


def _bounded(pending: bytes) -> None:
    if len(pending) > MAX_FRAME_BYTES:
        raise FrameTooLong(f"an event longer than {MAX_FRAME_BYTES} bytes")


class SSEDecoder:
    """Server-sent events, fed bytes as they arrive (``\\n`` or ``\\r\\n`` line ends)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        """The events completed by ``data`` (comments and data-less events skipped)."""
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")  # a CR LF cut in two is joined next time
        end = buffer.rfind(b"\n\n")
        if end < 0:
            _bounded(buffer)
            self._buffer = buffer
            return []
        self._buffer = buffer[end + 2 :]
        frames: list[Frame] = []
        append, match, limit = frames.append, _USUAL_EVENT.match, end + 2
        position = 0
        while position < limit:
            usual = match(buffer, position, limit)
            if usual is not None:
                name, data = usual.groups()
                append(_new_frame(Frame, (_event_name(name) if name else "", data)))
                position = usual.end()
                continue
            stop = buffer.find(b"\n\n", position, limit)
            if stop < 0:  # only the last line end is left
                break
            frame = _sse_event_slow(buffer[position:stop].strip(b"\n"))
            if frame is not None:
                append(frame)
            position = stop + 2
        return frames

    def flush(self) -> list[Frame]:
        """An event left unterminated at the end of the stream."""
        rest, self._buffer = self._buffer.strip(b"\n"), b""
        frame = _sse_event_slow(rest) if rest else None
        return [frame] if frame is not None else []


#: The usual event, matched in one call: one ``data:`` line, optionally after one ``event:``
#: line (any other shape goes through :func:`_sse_event_slow`).
_USUAL_EVENT = re.compile(rb"(?:event: ([^\n]*)\n)?data: ([^\n]*)\n\n")
_new_frame = tuple.__new__
_EVENT_NAMES: dict[bytes, str] = {}


def _event_name(raw: bytes) -> str:
    """An event name as text; the few names a provider uses are decoded once."""
    name = _EVENT_NAMES.get(raw)
    if name is None:
        name = raw.decode("utf-8", "replace")
        if len(_EVENT_NAMES) < 64:
            _EVENT_NAMES[raw] = name
    return name


def _sse_event_slow(block: bytes) -> Frame | None:
    """Any SSE event: several data lines, comments, fields without a space after the colon."""
    event = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data:
        return None
    return Frame(event, b"\n".join(data))


class NDJSONDecoder:
    """Newline-delimited JSON, fed bytes as they arrive: one frame per non-empty line."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        _bounded(self._buffer)
        return [Frame("", line.strip()) for line in lines if line.strip()]

    def flush(self) -> list[Frame]:
        rest, self._buffer = self._buffer.strip(), b""
        return [Frame("", rest)] if rest else []


async def sse_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[Frame]:
    """The events of a byte stream (see :class:`SSEDecoder`)."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for frame in decoder.feed(chunk):
            yield frame
    for frame in decoder.flush():
        yield frame


async def ndjson_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[Frame]:
    """The lines of a byte stream (see :class:`NDJSONDecoder`)."""
    decoder = NDJSONDecoder()
    async for chunk in chunks:
        for frame in decoder.feed(chunk):
            yield frame
    for frame in decoder.flush():
        yield frame


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds of an OpenAI-style duration (``"1s"``, ``"6m0s"``, ``"20ms"``), or None."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def retry_after_from_headers(headers: Mapping[str, str], now: datetime) -> float | None:
    """The wait (seconds) a rate-limited answer asks for, or None when it says nothing.

    In order: ``retry-after-ms``; ``retry-after`` (seconds or an HTTP date); the reset headers
    (Anthropic ``anthropic-ratelimit-*-reset``, RFC 3339; OpenAI ``x-ratelimit-reset-*``,
    durations). Among reset headers, the latest of those whose ``remaining`` is 0 (the limit that
    was hit), else the earliest.
    """
    milliseconds = _number(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return max(milliseconds / 1000, 0.0)
    after = headers.get("retry-after")
    if after:
        seconds = _number(after)
        if seconds is None:
            seconds = _until(_http_date(after), now)
        if seconds is not None:
            return max(seconds, 0.0)
    return _reset_wait(headers, now)


def _reset_wait(headers: Mapping[str, str], now: datetime) -> float | None:
    exhausted: list[float] = []
    resets: list[float] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("anthropic-ratelimit-") and lower.endswith("-reset"):
            wait = _until(_rfc3339(value), now)
            remaining = headers.get(lower[: -len("reset")] + "remaining")
        elif lower.startswith("x-ratelimit-reset-"):
            wait = parse_duration(value)
            remaining = headers.get("x-ratelimit-remaining-" + lower[len("x-ratelimit-reset-") :])
        else:
            continue
        if wait is None:
            continue
        resets.append(max(wait, 0.0))
        if remaining is not None and remaining.strip() == "0":
            exhausted.append(max(wait, 0.0))
    if exhausted:
        return max(exhausted)
    return min(resets) if resets else None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _http_date(text: str) -> datetime | None:
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None


def _rfc3339(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _until(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else (moment - now).total_seconds()
