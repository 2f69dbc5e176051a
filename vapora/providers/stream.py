"""A streaming call as an async iterator of text chunks that ends with a :class:`Completion`."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from events.contract import Usage
from vapora.errors import ProviderError, ProviderTimeout, ProviderUnavailable
from vapora.providers.values import (
    Completion,
    ProviderRequest,
    StreamBroken,
    Turn,
    may_reason,
    output_ceiling,
    sent_timeout,
)

if TYPE_CHECKING:
    from vapora.providers.base import ProviderClient

__all__ = ["CALLER_CANCELLED", "FORWARD_FAILED", "CompletionStream"]

#: The error type of a stream its caller abandoned (:meth:`CompletionStream.abandoned`).
FORWARD_FAILED = "forward_failed"
#: The error type of a stream its caller stopped reading (:meth:`CompletionStream.cancelled`).
CALLER_CANCELLED = "cancelled_by_caller"

_END = object()
_TIMED_OUT = object()
_FAILED = object()
_CLOSE_LIMIT = 5.0


class CompletionStream:
    """The text chunks of one streaming call; :attr:`completion` is set once it has ended.

    Use it as ``async with client.stream(req) as stream: async for text in stream: ...``; the
    ``async with`` is required: it holds the stream's time limits. A failure before the first
    chunk raises the classified ``ProviderError`` (the caller may fall back); after it,
    :class:`StreamBroken` with the partial text and usage. ``time_limit`` bounds the whole
    stream (seconds), ``first_token_limit`` the wait for the first chunk.

    How the limits are kept cheaply: one cancel scope spans the ``async with`` block, its
    deadline the first-token limit until text arrives, then the stream's limit, and none once
    the stream has ended (so the caller's code after the last chunk is never cut). No reader
    task and no timer per chunk: the iterator pulls the network itself, one read at a time,
    and each read may bring many chunks (the client parses all the frames a read completed).
    A limit that fires raises the timeout from the ``async with`` statement, or from the
    iteration when it fires while waiting for the network.
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
        past = output_ceiling(self._model, 0)
        self._turn = Turn(unseen_output=may_reason(self._model), past_limit=past)
        self._scope: anyio.CancelScope | None = None
        self._source: AsyncGenerator[None, None] | None = None
        self._end = math.inf
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
        time_limit, first_limit = self._limits
        now = anyio.current_time()
        self._end = now + time_limit
        self._scope = anyio.CancelScope(deadline=min(now + first_limit, self._end))
        self._scope.__enter__()
        self._source = self._client._stream_reads(self._request, self._model, self._turn)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._scope is not None and self._source is not None
        if self._outcome is None:  # the caller left early, or a limit fired: stop reading
            with anyio.move_on_after(_CLOSE_LIMIT, shield=True):
                await self._source.aclose()
        if not self._scope.__exit__(exc_type, exc, tb):
            return False
        # The scope caught its own cancellation: a time limit fired inside the block.
        if self._outcome is None and self._turn.done:
            # After the answer's final event (the grace for the rest of the body): the answer
            # is whole, the limit ends nothing.
            self._outcome = _END
            if self.completion is None:
                self._finish()
            return True
        failure = self._failure(_TIMED_OUT if self._outcome is None else self._outcome)
        if failure is not None:
            raise failure
        return True

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> str:
        if self._source is None:
            raise RuntimeError("use the stream as `async with client.stream(...) as stream`")
        parts = self._turn.parts
        while self._count >= len(parts) and self._outcome is None:
            await self._pull()
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

    async def _pull(self) -> None:
        """Read the network until new text arrives, the stream ends or it fails."""
        assert self._source is not None and self._scope is not None
        first = not self._turn.parts
        try:
            await self._source.__anext__()
        except StopAsyncIteration:
            self._settle(_END)
            return
        except ProviderError as error:
            self._settle(error)
            return
        if first and self._turn.parts:
            self._scope.deadline = self._end  # the first text: re-arm the timer, once

    def _settle(self, outcome: object) -> None:
        self._outcome = outcome
        assert self._scope is not None
        self._scope.deadline = math.inf  # ended: no limit on what the caller does next

    def _failure(self, outcome: object) -> ProviderError | None:
        """The error to raise for a failed stream (None once it was raised)."""
        if outcome is _FAILED:
            return None
        if outcome is _TIMED_OUT:
            first = self._count == 0
            limit = self._limits[1] if first else self._limits[0]
            if self._turn.sent:
                outcome = ProviderTimeout(
                    f"{self._client.name}: no {'first chunk' if first else 'end of stream'} "
                    f"within {limit:g}s",
                    provider=self._client.name,
                    error_type="timeout",
                )
            else:  # nothing went out: nothing to bill
                outcome = ProviderTimeout(
                    f"{self._client.name}: could not send the request within {limit:g}s",
                    provider=self._client.name,
                    error_type="connect_timeout",
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

    def abandoned(self, cause: BaseException) -> ProviderError:
        """The failure to raise when the caller cannot go on (forwarding the chunks failed):
        a :class:`StreamBroken` (error type ``forward_failed``) with the text received and the
        usage of all of it, so that what the provider billed so far is still recorded."""
        error = ProviderUnavailable(
            f"{self._client.name}: the stream was abandoned: forwarding it failed "
            f"({type(cause).__name__})",
            provider=self._client.name,
            error_type=FORWARD_FAILED,
        )
        return self._failed(error)

    def cancelled(self) -> ProviderError:
        """The failure to raise when the caller stopped reading (``vapora.stream.cancel``): a
        :class:`StreamBroken` (error type ``cancelled_by_caller``) whether or not a chunk was
        forwarded, since nobody waits for another provider's answer either, with the usage of
        all that was received (a count the provider had not reported yet bounded from above,
        as for any broken stream: the request went out, so its input may be billed)."""
        turn = self._turn
        # Nothing went out (cancelled while connecting): nothing to bill.
        billed = turn.answered or (turn.sent and not turn.refused)  # (a refusal bills nothing)
        usage, estimated = turn.usage(self._request) if billed else (Usage(), False)
        broken = StreamBroken(
            f"{self._client.name}: the caller stopped reading the stream "
            f"(after {self._count} chunks)",
            partial_text=self.text,
            first_token_ms=self._first_token_ms,
            provider=self._client.name,
            error_type=CALLER_CANCELLED,
            usage=usage,
        )
        broken.usage_estimated = estimated
        self._client._billed_at(broken, turn, self._request)
        return self._client._fail(broken)

    def _failed(self, error: ProviderError) -> ProviderError:
        """``error`` itself before the first chunk was forwarded, with the usage of what the
        provider was sent if it had answered (HTTP 2xx: it has the request and bills it; its
        input as reported, Anthropic's ``message_start``, or bounded), falling back to the
        next provider; after it, a StreamBroken with the text forwarded and the usage of all
        that was received. Either way a count the provider had not reported is bounded from
        above (:meth:`Turn.usage`)."""
        turn = self._turn
        if self._count == 0:
            # Answered (HTTP 2xx), or sent and timed out waiting for the answer, which the
            # provider may still make and bill (before 2026-11-27: recorded at $0).
            billed = turn.answered or (turn.sent and not turn.refused and sent_timeout(error))
            if billed and not (error.usage.input_tokens or error.usage.output_tokens):
                error.usage, error.usage_estimated = turn.usage(self._request)
            self._client._billed_at(error, turn, self._request)
            return self._client._fail(error)
        usage, estimated = turn.usage(self._request)
        broken = StreamBroken(
            f"{error.message} (after {self._count} chunks)",
            partial_text=self.text,
            first_token_ms=self._first_token_ms,
            provider=self._client.name,
            http_status=error.http_status,
            error_type=error.error_type,
            usage=usage,
        )
        broken.usage_estimated = estimated
        self._client._billed_at(broken, turn, self._request)
        broken.__cause__ = error
        return self._client._fail(broken)
