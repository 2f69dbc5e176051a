"""A streaming call as an async iterator of text chunks that ends with a :class:`Completion`."""

from __future__ import annotations

import time
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from vapora.errors import ProviderError, ProviderTimeout
from vapora.providers.values import Completion, ProviderRequest, StreamBroken, Turn

if TYPE_CHECKING:
    from vapora.providers.base import ProviderClient

__all__ = ["CompletionStream"]

_END = object()
_TIMED_OUT = object()


class CompletionStream:
    """The text chunks of one streaming call; :attr:`completion` is set once it has ended.

    Use it as ``async with client.stream(req) as stream: async for text in stream: ...``; the
    ``async with`` is required: it owns the task that reads the network. A failure before the
    first chunk raises the classified ``ProviderError`` (the caller may fall back); after it,
    :class:`StreamBroken` with the partial text and usage. ``time_limit`` bounds the whole
    stream (seconds), ``first_token_limit`` the wait for the first chunk.

    Why a reader task: the limits are one cancel scope around the whole read, whose deadline
    moves from the first-token limit to the stream's limit once text arrives; a timer per chunk
    would cost more than the rest of the client's per-chunk work. The reader appends to the
    call's text parts and wakes the iterator only when it is waiting, so a chunk that has
    already arrived costs the iterator nothing but an index.
    """

    def __init__(
        self,
        client: ProviderClient,
        request: ProviderRequest,
        time_limit: float,
        first_token_limit: float | None,
    ) -> None:
        self._client = client
        self._request = request
        self._model = request.model or client.model
        self._limits = (time_limit, first_token_limit or time_limit)
        self._turn = Turn()
        self._tasks: TaskGroup | None = None
        self._waiter: anyio.Event | None = None
        self._outcome: object = None
        self._started = time.perf_counter()
        self._first_token_ms: float | None = None
        self._count = 0
        self.completion: Completion | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._turn.parts[: self._count])

    async def __aenter__(self) -> CompletionStream:
        self._started = time.perf_counter()
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._read)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        self._tasks.cancel_scope.cancel()  # stop reading if the caller left early
        # The caller's own exception (if any) propagates as is, not in an exception group.
        await self._tasks.__aexit__(None, None, None)

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> str:
        if self._tasks is None:
            raise RuntimeError("use the stream as `async with client.stream(...) as stream`")
        parts = self._turn.parts
        while self._count >= len(parts) and self._outcome is None:
            self._waiter = anyio.Event()
            await self._waiter.wait()
        if self._count < len(parts):
            if self._count == 0:
                self._first_token_ms = (time.perf_counter() - self._started) * 1000
            self._count += 1
            return parts[self._count - 1]
        if self._outcome is _END:
            if self.completion is None:
                self._finish()
            raise StopAsyncIteration
        failure, self._outcome = self._failure(self._outcome), _FAILED
        if failure is None:
            raise StopAsyncIteration
        raise failure

    async def _read(self) -> None:
        """The reader task: frames into text parts under one moving deadline, then the outcome."""
        time_limit, first_limit = self._limits
        now = anyio.current_time()
        end = now + time_limit
        outcome: object = _TIMED_OUT
        with anyio.CancelScope(deadline=min(now + first_limit, end)) as scope:
            frames = self._client._frames(self._request, self._model, self._turn)
            async with aclosing(frames):
                try:
                    async for _ in frames:
                        if len(self._turn.parts) == 1:
                            scope.deadline = end  # the first text: re-arm the timer, once
                        self._wake()
                    outcome = _END
                except ProviderError as error:
                    outcome = error
        self._outcome = outcome
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def _failure(self, outcome: object) -> ProviderError | None:
        """The error to raise for a failed stream (None once it was raised)."""
        if outcome is _FAILED:
            return None
        if outcome is _TIMED_OUT:
            first = not self._turn.parts
            outcome = ProviderTimeout(
                f"{self._client.name}: no {'first chunk' if first else 'end of stream'} "
                f"within {self._limits[1] if first else self._limits[0]:g}s",
                provider=self._client.name,
                error_type="timeout",
            )
        assert isinstance(outcome, ProviderError)
        return self._failed(outcome)

    def _finish(self) -> None:
        client = self._client
        latency = (time.perf_counter() - self._started) * 1000
        client._latency.observe(latency)
        if self._first_token_ms is not None:
            client._ttft.observe(self._first_token_ms)
        self.completion = client._completion(
            self._turn, self._request, self._model, latency, self._first_token_ms, self._count
        )

    def _failed(self, error: ProviderError) -> ProviderError:
        """``error`` itself before the first chunk; after it, a StreamBroken (partial result)."""
        if not self._turn.parts:
            return self._client._fail(error)
        usage, _ = self._turn.usage(self._request)
        broken = StreamBroken(
            f"{error.message} (after {len(self._turn.parts)} chunks)",
            partial_text=self._turn.text,
            provider=self._client.name,
            http_status=error.http_status,
            error_type=error.error_type,
            usage=usage,
        )
        broken.__cause__ = error
        return self._client._fail(broken)


_FAILED = object()
