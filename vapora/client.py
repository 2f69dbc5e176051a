"""The Python client for other services: vapora over NATS, with our error tree.

::

    async with Client.connect("nats://127.0.0.1:4222") as vapora:
        result = await vapora.complete(prompt="Write a haiku", task_type="Documentation")
        async with vapora.stream(prompt="Tell me a story") as story:
            async for text in story:
                print(text, end="")
        print(story.result.cost_usd)          # the stream's ``end`` message
        report = await vapora.report()
        status = await vapora.budget()

Or wrap a connection the service already has: ``Client(nc)``. A contract error reply raises its
:class:`vapora.errors.VaporaError` subclass (:func:`vapora.errors.error_for_code`); no answer in
time raises :class:`vapora.errors.RequestTimeout`; no router running raises
:class:`vapora.errors.NoProviderAvailable`; ``Client.connect`` that reaches no NATS server raises
its subclass :class:`vapora.errors.NotConnected`, naming why.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import anyio
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.client import _default_error_callback as _nats_default_error_cb
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from opentelemetry.trace import Span

from events import subjects
from events.codec import DecodeError, decode, encode
from events.contract import (
    BudgetStatus,
    CompletionRequest,
    CompletionResult,
    CostReport,
    ErrorReply,
    ReportRequest,
    StreamCancel,
    StreamChunk,
    StreamEnd,
    StreamError,
    StreamMessage,
    Usage,
)
from vapora.config import redact_url
from vapora.errors import (
    InternalError,
    InvalidRequest,
    NoProviderAvailable,
    NotConnected,
    ProviderError,
    ProviderStreamBroken,
    RequestTimeout,
    VaporaError,
    describe,
    error_for_code,
    request_error,
)
from vapora.telemetry.messaging import end_request, publish_under, request_span, start_request

__all__ = ["Client", "TextStream"]

T = TypeVar("T")

_ERROR_CODE = "Nats-Service-Error-Code"
_ERROR = "Nats-Service-Error"
_STATUS = "Status"
_NO_RESPONDER_PAUSES = (0.05, 0.1, 0.2, 0.4)
_stream_decoder: msgspec.json.Decoder[StreamMessage] = msgspec.json.Decoder(StreamMessage)
# Streams left open and dropped (see TextStream.__del__), held until they are closed.
_abandoned: set[asyncio.Task[None]] = set()


def _close_abandoned(stream: TextStream) -> None:
    """Close ``stream`` (on its connection's loop, in a task of its own)."""
    task = asyncio.get_running_loop().create_task(stream.aclose())
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


def _error_of(message: Msg) -> VaporaError | None:
    """The error a reply carries (service-error headers or an error body), or None."""
    headers = message.headers or {}
    if headers.get(_STATUS) == "503":
        return NoProviderAvailable("no vapora actor serves this subject (no responders)")
    if not headers.get(_ERROR_CODE):
        return None
    try:
        reply = decode(message.data, ErrorReply)
        error = error_for_code(reply.error.code, reply.error.message)
        # The task it ended, and what the attempt cost when vapora knows it (an extension).
        return error.of_task(reply.task_id, reply.usage, reply.cost_usd)
    except DecodeError:
        return error_for_code("internal", headers.get(_ERROR, "error"))


def _request_of(
    request: CompletionRequest | None, fields: dict[str, Any]
) -> tuple[bytes, dict[str, str] | None]:
    """The request's bytes, and the headers that go with it. A task id is given when the caller
    gave none, so that an error (a timeout among them) can name the task whose spend vapora
    records; the ``Vapora-Task-Scope: request`` header says it names this request alone."""
    if request is not None:
        if fields:
            raise TypeError("pass either a CompletionRequest or keyword fields, not both")
    else:
        try:
            request = msgspec.convert(fields, CompletionRequest)
        except msgspec.ValidationError as exc:
            raise request_error(str(exc)) from exc  # as vapora would answer it
    scope = None
    if request.task_id is None:
        # 128 random bits as 32 hex digits (``uuid4().hex`` without building a UUID).
        request = msgspec.structs.replace(request, task_id=os.urandom(16).hex())
        scope = _REQUEST_SCOPE
    try:
        return encode(request), scope
    except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 can carry it
        raise InvalidRequest(
            f"a string holds a character that is not UTF-8 ({exc.reason})"
        ) from exc


_REQUEST_SCOPE = {subjects.TASK_SCOPE_HEADER: "request"}


def _with(headers: dict[str, str] | None, more: dict[str, str] | None) -> dict[str, str] | None:
    return {**(headers or {}), **more} if more else headers


def _task_of(payload: bytes) -> str | None:
    try:
        return msgspec.json.decode(payload, type=_TaskOnly).task_id
    except msgspec.DecodeError:
        return None


class _TaskOnly(msgspec.Struct):
    task_id: str | None = None


def _too_large(payload: bytes, nc: NATS) -> InvalidRequest:
    return InvalidRequest(
        f"the request is {len(payload)} bytes, more than the NATS server takes ({nc.max_payload})"
    )


class Client:
    """vapora for a Python service, over an existing NATS connection (see the module doc)."""

    def __init__(self, nc: NATS, *, timeout_s: float = 120.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str = "nats://127.0.0.1:4222", *, timeout_s: float = 120.0, **options: Any
    ) -> AsyncIterator[Client]:
        """Connect to NATS at ``url`` (comma-separated for a cluster); closed on exit."""
        servers = [u.strip() for u in url.split(",") if u.strip()]
        options.setdefault("connect_timeout", 5)
        # Back soon after a server restart: an answer published while the caller is away is
        # dropped (core NATS), and the caller would wait out its whole timeout for a call that
        # was made and billed. nats-py waits 2 s; vapora's actors 0.5 s.
        options.setdefault("reconnect_time_wait", 0.25)
        # And never give up (nats-py stops after 60 tries: 15 s at that pace), as the actors:
        # a service outlives a server's restart or failover, however long.
        options.setdefault("max_reconnect_attempts", -1)
        # Replies under the user's own prefix, which a deployment's permissions can let only
        # that user receive (docs/operations-cluster.md).
        other = bool(options.keys() & {"token", "user_credentials", "nkeys_seed"})
        prefix = subjects.inbox_prefix(options.get("user"), servers, token_or_creds=other)
        options.setdefault("inbox_prefix", prefix)
        # The last error of the tries, to say why none connected (the deadline's TimeoutError
        # says nothing); passed on to the caller's callback, or to nats-py's own.
        # nats-py's own callback logs each failed try with its traceback (about 60 while no
        # server answers): not until the client is connected, the error raised then says why.
        errors: list[Exception] = []
        own = options.get("error_cb")
        passed_on = own or _nats_default_error_cb
        connected = False

        async def error_cb(exc: Exception) -> None:
            errors[:] = [exc]
            if own is None and not connected:
                return
            said = passed_on(exc)  # any callable: a coroutine function, or one returning none
            if inspect.isawaitable(said):
                await said

        options["error_cb"] = error_cb
        try:
            with anyio.fail_after(options.pop("initial_deadline_s", 15.0)):
                nc = await nats.connect(servers=servers, **options)
            connected = True
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            cause = errors[0] if errors and isinstance(exc, TimeoutError) else exc
            shown = ",".join(redact_url(server) for server in servers)  # no password shown
            raise NotConnected(
                f"cannot connect to NATS at {shown} ({describe(cause)}); is vapora up, and is "
                "this its NATS URL?"
            ) from exc
        try:
            yield cls(nc, timeout_s=timeout_s)
        finally:
            try:
                await nc.drain()
            except nats.errors.Error:  # the server away (reconnecting): nothing to drain to
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _ask(
        self,
        subject: str,
        payload: bytes,
        reply_type: type[T],
        wait_s: float,
        more: dict[str, str] | None = None,
    ) -> T:
        # The request's span covers the reply and records the error that ends the request,
        # a contract error reply among them (its code as ``error.type``).
        with request_span(subject) as headers:
            message = await self._request(subject, payload, wait_s, _with(headers, more))
            error = _error_of(message)
            if error is not None:
                raise error
            try:
                # Up to what the server carries: an answer may be longer than a request may be.
                return decode(message.data, reply_type, max_bytes=self.nc.max_payload)
            except DecodeError as exc:
                raise InternalError(f"unreadable reply on {subject}: {exc}") from exc

    async def _request(
        self, subject: str, payload: bytes, wait_s: float, headers: dict[str, str] | None
    ) -> Msg:
        try:
            return await self._send(subject, payload, wait_s, headers)
        except NoRespondersError as exc:
            raise NoProviderAvailable(f"no vapora actor serves {subject}") from exc
        except TimeoutError as exc:
            # The task runs on in vapora: its id says where its spend is recorded.
            raise RequestTimeout(
                f"no answer on {subject} within {wait_s:g} s (task {_task_of(payload)})"
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise _too_large(payload, self.nc) from exc

    async def _send(
        self, subject: str, payload: bytes, wait_s: float, headers: dict[str, str] | None
    ) -> Msg:
        # "No responders" can be momentary (an actor restarting, interest still propagating in
        # a cluster): try a few times over about a second before giving up.
        for pause in _NO_RESPONDER_PAUSES:
            try:
                return await self.nc.request(subject, payload, timeout=wait_s, headers=headers)
            except NoRespondersError:
                await anyio.sleep(pause)
        return await self.nc.request(subject, payload, timeout=wait_s, headers=headers)

    async def complete(
        self,
        request: CompletionRequest | None = None,
        /,
        *,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> CompletionResult:
        """One completion: pass a :class:`CompletionRequest` or its fields (``prompt=`` …)."""
        payload, scope = _request_of(request, fields)
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        return await self._ask(subjects.COMPLETE, payload, CompletionResult, wait_s, scope)

    def stream(
        self,
        request: CompletionRequest | None = None,
        /,
        *,
        idle_timeout: float | None = None,
        **fields: Any,
    ) -> TextStream:
        """A streamed completion: iterate the returned :class:`TextStream` for text chunks."""
        payload, scope = _request_of(request, fields)
        idle = self.timeout_s if idle_timeout is None else idle_timeout
        return TextStream(self.nc, payload, idle, scope)

    async def report(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> CostReport:
        """The cost ledger's report for ``[since, until)`` (all time by default)."""
        payload = encode(ReportRequest(since=since, until=until))
        return await self._ask(subjects.REPORT, payload, CostReport, self.timeout_s)

    async def budget(self) -> BudgetStatus:
        """The budget keeper's status: limits, spend, reservations, tier."""
        return await self._ask(subjects.BUDGET, b"{}", BudgetStatus, self.timeout_s)


class TextStream:
    """The text chunks of one ``vapora.stream`` task, in order.

    Ends normally with :attr:`result` (the ``end`` message) set; a failure raises its
    :class:`VaporaError` with :attr:`error` set, and for a stream that broke after its first
    chunk :attr:`usage` and :attr:`cost_usd` say what was billed. ``idle_timeout`` bounds the wait
    for each message (:class:`RequestTimeout`). With tracing on, the request's ``publish`` span
    lasts until the stream ends, fails (its error recorded) or is closed.
    """

    def __init__(
        self,
        nc: NATS,
        payload: bytes,
        idle_timeout: float,
        more_headers: dict[str, str] | None = None,
    ) -> None:
        self._nc = nc
        self._payload = payload
        self._more_headers = more_headers
        self._idle_timeout = idle_timeout
        self._sub: Subscription | None = None
        self._closed = False  # closed (or ended): never sent again
        self._gave_up = False  # its idle timeout passed: vapora is told to stop it
        self._next_seq = 0
        self._early: dict[int, str] = {}
        self._retries = list(_NO_RESPONDER_PAUSES)
        self._headers: dict[str, str] | None = None
        self._span: Span | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's, once started
        self.task_id: str | None = None
        self.text = ""
        self.result: StreamEnd | None = None
        self.error: VaporaError | None = None
        self.usage: Usage | None = None
        self.cost_usd: Decimal | None = None

    async def __aenter__(self) -> TextStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> TextStream:
        return self

    def __del__(self) -> None:
        # Iterated without ``async with`` and dropped before its end (a ``break`` out of an
        # ``async for``): closed as aclose() would, so vapora stops the provider too, rather
        # than let it generate (and bill) the whole answer. Always on the connection's own
        # loop (nats-py is not thread-safe), whatever thread the collector runs on.
        loop = self._loop
        if self._sub is None or self._closed or loop is None or loop.is_closed():
            return  # (a closed loop, at interpreter shutdown: nothing can be sent)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _close_abandoned(self)
        else:  # collected on another thread (the cyclic GC runs anywhere): sent from the loop's
            with contextlib.suppress(RuntimeError):  # the loop closed since: nothing to send
                loop.call_soon_threadsafe(_close_abandoned, self)

    async def aclose(self) -> None:
        """Stop listening. A stream closed before its end is cancelled in vapora too
        (``vapora.stream.cancel``): the provider stops generating, and what it generated until
        then is billed (:attr:`error` is not set: the caller chose to stop)."""
        self._closed = True
        span, self._span = self._span, None
        sub, self._sub = self._sub, None
        try:
            if sub is not None:
                # Stopped before its end, by the caller or by its idle timeout: the provider is
                # stopped too (a stream vapora ended, with its end or its error, needs no
                # cancel). The cancel is in the stream's trace: its publish span under the
                # stream's.
                if self.result is None and (self.error is None or self._gave_up):
                    with contextlib.suppress(Exception):
                        cancel = encode(StreamCancel(stream_to=sub.subject))
                        trace = getattr(self, "_trace_headers", None)
                        with publish_under(span, subjects.STREAM_CANCEL, trace) as headers:
                            await self._nc.publish(subjects.STREAM_CANCEL, cancel, headers=headers)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                # Another task waiting for the next chunk ends now (it waited out its idle
                # timeout, then said the stream had sent nothing).
                for waiting in list(
                    (getattr(sub, "_pending_next_msgs_calls", None) or {}).values()
                ):
                    waiting.cancel()
        finally:
            end_request(span, self.error)  # once, however the awaits above ended

    async def _start(self) -> Subscription:
        self._loop = asyncio.get_running_loop()
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        # The span covers the stream (ended by aclose); the router's spans continue its trace.
        self._span, trace_headers = start_request(subjects.STREAM)
        self._trace_headers = trace_headers  # the stream's context, for its cancel
        # Sent again as they are when the first publish found no router (see __anext__).
        self._headers = _with(trace_headers, self._more_headers)
        try:
            await self._nc.publish(
                subjects.STREAM,
                self._payload,
                reply=inbox,
                headers=self._headers,
            )
        except BaseException as exc:
            span, self._span = self._span, None
            end_request(span, exc)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if isinstance(exc, nats.errors.MaxPayloadError):
                raise _too_large(self._payload, self._nc) from exc
            raise
        return sub

    async def __anext__(self) -> str:
        if self._closed:
            # Closed (or ended): iterated again, never sent again. Chunks that came ahead of a
            # gap are dropped with the rest (they kept it iterating, and it sent the request
            # again: a second paid stream).
            raise StopAsyncIteration
        while True:
            if self._next_seq in self._early:
                return self._take(self._early.pop(self._next_seq))
            if self.result is not None and self.result.chunks is None and self._early:
                # An older router's end (no count): what came is handed over, across any gap.
                self._next_seq = min(self._early)
                continue
            if self.error is not None or (self.result is not None and self._complete()):
                await self.aclose()
                raise StopAsyncIteration
            if self._sub is None:
                self._sub = await self._start()
            message = await self._receive(self._sub)
            if self._no_responders(message) and self._retries:
                await anyio.sleep(self._retries.pop(0))
                await self._nc.publish(
                    subjects.STREAM, self._payload, reply=self._sub.subject, headers=self._headers
                )
                continue
            try:
                text = self._handle(message)
            except VaporaError:
                await self.aclose()  # also when used without ``async with``
                raise
            if text is not None:
                return text

    def _complete(self) -> bool:
        """Whether every chunk has been handed over, the end having come. The end comes from the
        router and the chunks from the provider actor: on a cluster the end can overtake the
        last of them, which are then still awaited (an older router's end has no count)."""
        assert self.result is not None
        return self.result.chunks is None or self._next_seq >= self.result.chunks

    async def _receive(self, sub: Subscription) -> Msg:
        try:
            return await sub.next_msg(timeout=self._idle_timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise StopAsyncIteration from None  # closed by another task (see aclose)
            raise
        except TimeoutError as exc:
            if self.result is not None and self.result.chunks is not None:
                self.error = RequestTimeout(
                    f"the stream ended after {self.result.chunks} chunks, but chunk "
                    f"{self._next_seq} never came (waited {self._idle_timeout:g} s)"
                )
            else:
                self.error = RequestTimeout(f"the stream sent nothing for {self._idle_timeout:g} s")
            self._gave_up = True  # the caller stops waiting: vapora is told to stop
            await self.aclose()
            raise self.error from exc

    def _no_responders(self, message: Msg) -> bool:
        return (message.headers or {}).get(_STATUS) == "503"

    def _handle(self, message: Msg) -> str | None:
        error = _error_of(message)
        if error is not None and not message.data.startswith(b'{"type"'):
            self._fail(error)
        try:
            item = _stream_decoder.decode(message.data)
        except msgspec.DecodeError as exc:
            self._fail(InternalError(f"unreadable stream message: {exc}"))
            raise AssertionError from exc  # unreachable: _fail raises
        match item:
            case StreamChunk():
                self.task_id = item.task_id
                if item.seq < self._next_seq:
                    return None  # a repeat of one handed over already
                if item.seq != self._next_seq:
                    self._early[item.seq] = item.text
                    return None
                return self._take(item.text)
            case StreamEnd():
                self.result = item
                self.task_id = item.task_id
            case StreamError():
                self.usage, self.cost_usd = item.usage, item.cost_usd
                self.task_id = item.task_id or self.task_id
                error = error_for_code(item.error.code, item.error.message)
                if item.error.code == ProviderError.code and self._next_seq:
                    # Broken after text came: not the caller's error (a ProviderRejected).
                    error = ProviderStreamBroken(item.error.message, provider="")
                self._fail(error.of_task(self.task_id, item.usage, item.cost_usd))
        return None

    def _take(self, text: str) -> str:
        self._next_seq += 1
        self.text += text
        return text

    def _fail(self, error: VaporaError) -> None:
        # The subscription is dropped by aclose() (``async with`` or the next iteration).
        self.error = error
        raise error
