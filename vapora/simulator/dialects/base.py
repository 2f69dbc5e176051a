"""What every provider dialect of the simulator provides, and shared helpers."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import msgspec

from vapora.simulator.behaviour import Behaviour
from vapora.simulator.http import Request
from vapora.simulator.reply import Reply, Turn

__all__ = ["BadRequest", "Dialect", "ErrorAnswer", "StreamPlan", "encode", "sse", "text_of"]

encode = msgspec.json.encode
ErrorAnswer = tuple[int, list[tuple[str, str]], bytes]


class BadRequest(Exception):
    """The request body is not what the provider accepts: answered with its 400 shape."""


class StreamPlan:
    """A stream's frames: the head, one frame per chunk, the tail (all already framed)."""

    __slots__ = ("chunks", "head", "tail")

    def __init__(self, head: list[bytes], chunks: list[bytes], tail: list[bytes]) -> None:
        self.head = head
        self.chunks = chunks
        self.tail = tail


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, bytes) else encode(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def text_of(content: Any) -> str:
    """The text of a message content: a string, or a list of text blocks/parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(text_of(part) for part in content)
    return ""


def retry_seconds(behaviour: Behaviour) -> float:
    return (behaviour.retry_ms if behaviour.retry_ms is not None else 1000) / 1000


def ceil_seconds(behaviour: Behaviour) -> int:
    return max(1, math.ceil(retry_seconds(behaviour)))


class Dialect(ABC):
    """One provider's wire format, as the simulator speaks it."""

    name: str
    stream_content_type: str = "text/event-stream; charset=utf-8"

    @abstractmethod
    def authorized(self, request: Request) -> bool:
        """Whether the request carries credentials where the provider expects them."""

    @abstractmethod
    def turn(self, body: Any, request: Request) -> Turn:
        """Read the request body; raise ``BadRequest`` when the provider would answer 400."""

    @abstractmethod
    def completion(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> bytes:
        """The non-streaming JSON body."""

    @abstractmethod
    def stream(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> StreamPlan:
        """The streaming frames."""

    @abstractmethod
    def stream_error(self) -> bytes:
        """The frame of an error that arrives after HTTP 200."""

    @abstractmethod
    def error(self, status: int, behaviour: Behaviour, message: str | None = None) -> ErrorAnswer:
        """An HTTP error answer in the provider's shape; ``status`` 0 means quota exhausted."""

    @abstractmethod
    def overflow(self, tokens: int, window: int) -> ErrorAnswer:
        """The provider's answer to an input of ``tokens`` tokens for a ``window``-token model."""

    def malformed_frame(self) -> bytes:
        """A stream frame that is not valid JSON."""
        return b'data: {"type": "oops", "broken\n\n'

    def malformed_body(self) -> bytes:
        return b'{"id": "broken", "choices": [ {"unterminated'

    def content_type(self, turn: Turn) -> str:
        return self.stream_content_type if turn.stream else "application/json"
