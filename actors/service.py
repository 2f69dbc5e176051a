"""The actor runtime: NATS Services API endpoints that decode, run bounded and answer errors.

An actor declares :class:`Endpoint` s and runs them in an :class:`ActorService`:

* each endpoint is a NATS "micro" endpoint, so ``$SRV.PING/INFO/STATS`` discover and measure it
  (nats-py's micro service answers those; the endpoint's own subscription is ours);
* messages arrive on the connection's raw fast path (no ``Msg``, no per-subscription queue and
  task hop; headers parsed only when read) and each starts its handler as its own task, up to
  ``max_concurrency`` at once: a handler awaiting I/O never stalls the others. Beyond that, up to
  ``max_backlog`` messages wait in order; past both, the sender gets ``503 overloaded`` at once
  rather than a queue without bound or a hang;
* the body is decoded with the endpoint's typed decoder; a malformed, oversized or invalid message
  is answered with the contract's 400 ``invalid_request`` naming the field, and touches nothing;
* :class:`vapora.errors.VaporaError` s become service-error replies with their contract code; any
  other exception is logged and answered ``500 internal`` without internals;
* trace context is continued from the request headers and injected into every reply;
* :meth:`ActorService.stop` stops taking work, lets in-flight handlers finish within a deadline,
  then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Endpoint as MicroEndpoint
from nats.micro.service import EndpointConfig, EndpointStats, Service

from actors import instances, tracing
from actors.connection import Client, raw_header
from events import subjects
from events.codec import MAX_MESSAGE_BYTES, DecodeError, decode, encode
from events.contract import ErrorBody, ErrorReply, StreamError
from vapora import errors
from vapora.errors import InternalError, InvalidRequest, RequestTimeout, VaporaError
from vapora.telemetry.messaging import current_failed

__all__ = [
    "ActorService",
    "Endpoint",
    "Overloaded",
    "Sparing",
    "RequestContext",
    "error_headers",
    "error_payload",
]

log = logging.getLogger("vapora.actor")

# A subject an answer may be published to: literal tokens (no wildcard, no whitespace, none
# empty), not a system one (``$JS.``, ``$SRV.``, ``$SYS.``, ...).
_REPLY_SUBJECT = re.compile(r"[^\s.*>$][^\s.*>]*(?:\.[^\s.*>]+)*")


def reply_problem(reply: str, reserved: tuple[str, ...]) -> str | None:
    """Why answers must not be published to ``reply`` (None: they may). ``reserved``: subject
    prefixes of vapora's own that a reply must not fall under (the event log's: the stream
    would store each answer as an event that no reader can decode)."""
    if not _REPLY_SUBJECT.fullmatch(reply):
        return "is not a literal subject outside the system's ($...)"
    if reply.startswith(reserved):
        return "is under the event log's subjects"
    if reply in _REQUEST_SUBJECTS or (
        reply.startswith("vapora.provider.") and reply.endswith(".call")
    ):
        # Each answer (each chunk of a stream) would land as a request on vapora's actors:
        # a stream answered to vapora.stream.cancel had every provider actor log every chunk.
        return "is one of vapora's own request subjects"
    return None


#: vapora's request subjects: none may be a reply subject (:func:`reply_problem`).
_REQUEST_SUBJECTS = frozenset(
    {
        subjects.COMPLETE,
        subjects.STREAM,
        subjects.STREAM_CANCEL,
        subjects.REPORT,
        subjects.BUDGET,
        subjects.BUDGET_RESERVE,
        subjects.BUDGET_RELEASE,
        subjects.BUDGET_LEASE,
        subjects.BUDGET_LEASE_RETURN,
        subjects.BUDGET_CAPS,
        subjects.BUDGET_PENDING,
        subjects.BUDGET_UNBILLED,
    }
)


class Sparing:
    """Counts what happens too often to say each time (anyone may send it): :meth:`count`
    gives how many since the last time it was said when it may be said again (once every
    ``every_s`` seconds), else None."""

    __slots__ = ("every_s", "said_at", "unsaid")

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.said_at = -math.inf
        self.unsaid = 0

    def count(self) -> int | None:
        self.unsaid += 1
        now = time.monotonic()
        if now - self.said_at < self.every_s:
            return None
        count, self.said_at, self.unsaid = self.unsaid, now, 0
        return count


T = TypeVar("T")
Reply = msgspec.Struct | bytes | None

#: Room kept in a message for its headers (trace context, error headers): a reply's body may
#: take the server's ``max_payload`` less this.
HEADER_ROOM = 16 * 1024


def reply_room(nc: Any) -> int:
    """The most bytes a reply's body may have on connection ``nc`` (its server's
    ``max_payload``, headers' room kept)."""
    return int(nc.max_payload) - HEADER_ROOM


Handler = Callable[[T, "RequestContext"], Awaitable[Reply]]


@dataclass(frozen=True, kw_only=True)
class Endpoint(Generic[T]):
    """One request subject an actor serves; ``handler`` gets the decoded request."""

    name: str
    subject: str
    request_type: type[T]
    handler: Handler[T]
    queue_group: str | None = None
    timeout: float | None = 120.0
    max_bytes: int = MAX_MESSAGE_BYTES
    #: A request without a reply subject is dropped (its answer could reach nobody, and its
    #: work may cost money: a completion, a provider call).
    needs_reply: bool = False
    #: The reply subject receives a stream (``vapora.stream``): an error this service answers
    #: itself (a bad request, overload, a timeout, a stop, a bug) is the stream's last message,
    #: ``{"type": "error", "error": {...}}``, as the handler's own errors are (DESIGN §3).
    stream: bool = False
    #: The error a request that cannot be decoded is answered with (default: a 400 naming what
    #: was wrong); an endpoint whose contract says otherwise for some of them sets it.
    decode_error: Callable[[DecodeError], VaporaError] | None = None


@dataclass(kw_only=True)
class RequestContext:
    """What a handler may know about the message it handles, and how to answer more than once."""

    nc: NATS
    subject: str
    reply: str
    raw_headers: bytes | None = None
    #: Seconds the request waited in the backlog before its handler started (0: it did not).
    queued_s: float = 0.0

    @property
    def headers(self) -> dict[str, str]:
        if not self.raw_headers:
            return {}
        return Client._parse_header_lines(self.raw_headers[self.raw_headers.find(b"\r\n") :])

    def header(self, name: str) -> str | None:
        """One header's value (None: absent), without parsing the whole block."""
        return raw_header(self.raw_headers, name)

    async def publish(
        self, subject: str, message: msgspec.Struct | bytes, *, reply: str = ""
    ) -> None:
        """Publish to ``subject`` (e.g. stream chunks to the reply subject) with trace context;
        ``reply``: where the server says when nobody listens on ``subject`` (a 503 status)."""
        data = message if isinstance(message, bytes) else encode(message)
        await self.nc.publish(subject, data, reply=reply, headers=tracing.inject() or None)


@dataclass
class _Counters:
    in_flight: int = 0
    completed: int = 0
    errors: int = 0
    rejected: int = 0
    dropped: int = 0  # requests that could not or must not be answered (their reply subject)
    by_code: dict[str, int] = field(default_factory=dict)


_Message = tuple[str, str, bytes, bytes | None]


class _Deadlines:
    """Cancels the scopes of one endpoint's requests that outlive its timeout, with one timer.

    A scope given a deadline arms and cancels a loop timer of its own: ~2 of the ~6 us a scope
    cost per request (in-process, uvloop). An endpoint's timeout is fixed and the loop's clock
    monotonic, so its deadlines come in start order: the next to expire is always the oldest
    still pending, and one timer, re-armed for it, serves them all.
    """

    __slots__ = ("_loop", "_pending", "_timeout", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._pending: dict[anyio.CancelScope, float] = {}  # in start order
        self._timer: asyncio.TimerHandle | None = None

    def add(self, scope: anyio.CancelScope) -> float:
        """Cancel ``scope`` once the timeout has passed from now (unless it is discarded)."""
        deadline = self._loop.time() + self._timeout
        self._pending[scope] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)
        return deadline

    def discard(self, scope: anyio.CancelScope) -> None:
        self._pending.pop(scope, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        pending = self._pending
        while pending:
            scope = next(iter(pending))
            if pending[scope] > now:
                self._timer = self._loop.call_at(pending[scope], self._expire)
                return
            del pending[scope]
            scope.cancel()


class _Served:
    """One endpoint as the service runs it: its counters, its micro endpoint, its deadlines."""

    __slots__ = ("counters", "deadlines", "endpoint", "micro")

    micro: MicroEndpoint  # set when the endpoint is added to the micro service
    deadlines: _Deadlines | None  # set by ``run`` (it needs the loop); None: no timeout

    def __init__(self, endpoint: Endpoint[Any]) -> None:
        self.endpoint = endpoint
        self.counters = _Counters()
        self.deadlines = None


#: The most of an error's message an answer carries, in its ``Nats-Service-Error`` header and in
#: its body alike. A message quoting a caller's input (a 600 KB unknown field's name) carried it
#: twice: past a 1 MB server's ``max_payload``, the server closed the actor's connection.
MAX_ERROR_MESSAGE = 2_000


def shown_message(message: str) -> str:
    """``message``, cut to :data:`MAX_ERROR_MESSAGE` characters, the note saying how many were
    cut included (the contract's bound is on what a caller receives)."""
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    note = f"... ({len(message):,} characters in all)"  # (its length does not depend on the cut)
    return message[: MAX_ERROR_MESSAGE - len(note)] + note


def error_payload(error: VaporaError, *, stream: bool = False) -> bytes:
    """The contract's error body for ``error``; for a stream, its ``error`` message."""
    body = ErrorBody(code=error.code, message=shown_message(error.message))
    task, usage, cost = error.task_id, error.task_usage, error.task_cost_usd
    if stream:
        return encode(StreamError(error=body, task_id=task, usage=usage, cost_usd=cost))
    return encode(ErrorReply(error=body, task_id=task, usage=usage, cost_usd=cost))


#: Set to ``unknown`` on the answer to a request whose handler a stop cut while it ran: what it
#: did is unknown (a provider call may have been billed). A router keeps such an attempt's hold,
#: as for a call that never answered; a 503 without it never ran (a refusal from the backlog).
OUTCOME_HEADER = "Vapora-Outcome"


def error_headers(error: VaporaError, *, failed: bool = True) -> dict[str, str]:
    """The NATS Services API error headers for ``error``, plus trace context. The current span
    (the one handling the request this answers) gets the ERROR status and ``error.type``, the
    error's contract code (``budget_exceeded``, ``timeout``, ``internal`` ...), unless not
    ``failed`` (an answer that is no failure of the handler's: a stream its caller stopped)."""
    headers = {
        "Nats-Service-Error-Code": str(error.status),
        "Nats-Service-Error": shown_message(error.message),
    }
    if failed:
        current_failed(error.code)
    return tracing.inject(headers)


class ActorService:
    """Serve ``endpoints`` as one NATS micro service until :meth:`stop` or cancellation."""

    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        endpoints: list[Endpoint[Any]],
        version: str = "0.1.0",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        max_concurrency: int = 1024,
        max_backlog: int = 10_000,
        drain_timeout: float = 10.0,
        reserved_replies: tuple[str, ...] = (subjects.EVENTS_PREFIX + ".",),
    ) -> None:
        self.nc = nc
        self.name = name
        #: Subject prefixes a reply subject must not fall under (:func:`reply_problem`).
        self.reserved_replies = reserved_replies
        self._drops = Sparing()  # requests dropped unanswerable, said once a minute
        self.endpoints = endpoints
        self.version = version
        self.description = description
        self.metadata = dict(metadata or {})
        self.max_concurrency = max_concurrency
        self.max_backlog = max_backlog
        self.drain_timeout = drain_timeout
        self._served = {e.name: _Served(e) for e in endpoints}
        # Requests waiting for a handler, with when they arrived (time.monotonic()).
        self._backlog: deque[tuple[_Served, _Message, float]] = deque()
        self._running = 0  # handlers running: what max_concurrency bounds
        self._refusing = 0  # 503 replies being sent: neither a handler nor a concurrency slot
        self._stop = anyio.Event()
        self._closed = False  # past the drain: a message still delivered starts nothing
        self._late: set[asyncio.Task[bool]] = set()  # refusals of messages delivered after it
        self._idle = anyio.Event()
        # Each running handler's scope and task; a handler removes itself when it ends (cheaper
        # than a done callback, which the loop would schedule as one more callback per request).
        self._handlers: dict[anyio.CancelScope, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: Service | None = None
        self._scope_type: Callable[[], anyio.CancelScope] = anyio.CancelScope

    @property
    def in_flight(self) -> int:
        return self._running + self._refusing + len(self._backlog)

    def stop(self) -> None:
        """Ask the service to stop taking work and drain (idempotent, callable from anywhere)."""
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` is called; then drain within ``drain_timeout`` seconds.

        Handlers run as plain asyncio tasks owned by this service, each inside its own anyio
        cancel scope (an anyio task group's ``start_soon`` plus ``fail_after`` cost several
        times ``create_task`` plus one scope per message). A handler that outlives its
        endpoint's timeout is cancelled through its scope (one timer per endpoint watches
        them all, see :class:`_Deadlines`) and answered 504. Whatever is still running when
        the drain deadline passes, or when ``run`` itself is cancelled, is cancelled through
        its scope too (so shielded sections stay shielded, as in a task group) and awaited here.
        """
        self._loop = loop = asyncio.get_running_loop()
        # The running backend's scope class, made directly: ``anyio.CancelScope(...)`` looks the
        # backend up on every call (~1.5 us per request).
        self._scope_type = type(anyio.CancelScope())
        for served in self._served.values():
            timeout = served.endpoint.timeout
            served.deadlines = None if timeout is None else _Deadlines(loop, timeout)
        registered: Path | None = None
        try:
            self._service = await self._start_service()
            server = instances.server_identity(getattr(self.nc, "_server_info", None) or {})
            registered = instances.register(self.name, self._service.id, server)
            task_status.started()
            await self._stop.wait()
            await self._unsubscribe()
            await self._drain()
        finally:
            if registered is not None:
                registered.unlink(missing_ok=True)
            await self._cancel_handlers()
            if self._service is not None and self._service._endpoints:
                # Cancelled before the drain (a hard stop): take the endpoints off the server
                # too, or requests sent to them wait out their timeout on a connection that
                # lives on (another actor's, or this process's until it exits).
                with anyio.move_on_after(2, shield=True):  # a hung server: do not wait 10 s
                    await self._unsubscribe()
            for served in self._served.values():
                if served.deadlines is not None:
                    served.deadlines.close()

    async def _cancel_handlers(self) -> None:
        self._stop.set()
        self._closed = True  # nothing more starts, not even from the backlog
        tasks = list(self._handlers.values())
        for scope in list(self._handlers):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._refuse_backlog()

    async def _refuse_unstarted(self, served: _Served, message: _Message) -> bool:
        """Answer 503 to a request a stop kept from starting (waiting in the backlog, or
        delivered after the handlers were cancelled): it never ran, so its sender may send it
        elsewhere at once instead of waiting out its own timeout. False: the connection is
        gone, nobody to answer."""
        try:
            stopped = Overloaded(self.name, "stopped before this request started; retry")
            await self._refuse(served, message, stopped)
        except Exception as exc:
            log.warning("%s: could not refuse a request the stop kept (%s)", self.name, exc)
            return False
        return True

    async def _refuse_backlog(self) -> None:
        """Refuse each request still waiting when the drain ends (its deadline passed, or
        ``run`` was cancelled)."""
        while self._backlog:
            served, message, _ = self._backlog.popleft()
            if not await self._refuse_unstarted(served, message):
                self._backlog.clear()

    async def _start_service(self) -> Service:
        service = await add_service(
            self.nc,
            name=self.name,
            version=self.version,
            description=self.description or None,
            metadata=self.metadata or None,
            stats_handler=self._stats,
        )
        for served in self._served.values():
            await self._add_endpoint(service, served)
        await self.nc.flush()
        return service

    async def _add_endpoint(self, service: Service, served: _Served) -> None:
        # The micro Endpoint object makes $SRV.INFO/STATS describe this endpoint; the
        # subscription that receives its messages is ours, on the raw fast path.
        endpoint = served.endpoint
        config = EndpointConfig(
            name=endpoint.name,
            subject=endpoint.subject,
            queue_group=endpoint.queue_group,
            handler=_unused_handler,
        )
        served.micro = micro = MicroEndpoint(service, config)
        micro._subscription = await self.nc.subscribe_raw(
            endpoint.subject,
            functools.partial(self._receive, served),
            queue=micro._queue_group,
        )
        service._endpoints.append(micro)

    async def withdraw(self, names: list[str]) -> None:
        """Stop taking requests on the endpoints named (their subscriptions drained: what the
        server sent before is still served), leaving their queue groups to other members; the
        others go on. Idempotent."""
        if self._service is None:
            return
        for name in names:
            served = self._served.get(name)
            subscription = served.micro._subscription if served is not None else None
            if served is None or subscription is None:
                continue
            served.micro._subscription = None
            with contextlib.suppress(Exception):  # a connection already gone: nothing to leave
                await subscription.drain()  # type: ignore[no-untyped-call]
            if served.micro in self._service._endpoints:
                self._service._endpoints.remove(served.micro)

    async def _unsubscribe(self) -> None:
        # Stopping must not fail because the connection is already gone or slow to flush. Not
        # cancelled from here: nats-py bounds the flush itself, and a flush cancelled before its
        # PONG arrives breaks the connection's read loop.
        # The endpoints' subscriptions are drained, not unsubscribed: a request the server sent
        # before it read the UNSUB is still received and served. nats-py's unsubscribe forgets
        # the subscription at once and drops it: its sender waited out its whole timeout, and
        # no other member of the queue group was offered it.
        assert self._service is not None
        try:
            for served in self._served.values():
                if served.micro._subscription is not None:
                    await served.micro._subscription.drain()  # type: ignore[no-untyped-call]
            self._service._endpoints = []  # drained: nothing left for stop() to unsubscribe
            await self._service.stop()
        except Exception as exc:
            log.warning("%s: unsubscribing failed (%s); draining anyway", self.name, exc)

    async def _drain(self) -> None:
        with anyio.move_on_after(self.drain_timeout):
            while self.in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self.in_flight:
            log.warning(
                "%s: %d requests unfinished after drain; cancelled", self.name, self.in_flight
            )

    def _stats(self, stats: EndpointStats) -> dict[str, Any]:
        counters = self._served[stats.name].counters
        return {
            "in_flight": counters.in_flight,
            "completed": counters.completed,
            "errors": counters.errors,
            "rejected_overloaded": counters.rejected,
            "dropped_unanswerable": counters.dropped,
            "errors_by_code": dict(counters.by_code),
        }

    def _receive(
        self, served: _Served, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        # Called synchronously by the connection's reader: hand the message off, never block,
        # never raise (an exception here would end the reader, and every actor on it with it).
        try:
            message: _Message = (subject.decode(), reply.decode(), data, headers)
        except UnicodeDecodeError:
            served.counters.dropped += 1
            log.warning(
                "%s: a request on %s has a reply subject that is not UTF-8 (%r); dropped, it "
                "cannot be answered",
                self.name,
                subject.decode(errors="replace"),
                reply[:64],
            )
            return
        served.micro._num_requests += 1
        reply_to = message[1]
        if reply_to:
            problem = reply_problem(reply_to, self.reserved_replies)
            if problem is not None:
                self._drop(served, message, f"its reply subject {reply_to[:64]!r} {problem}")
                return
        elif served.endpoint.needs_reply:
            self._drop(served, message, "it has no reply subject: nobody could get the answer")
            return
        if self._closed:
            # Stopped hard, the endpoints not yet off the server: refused (it never ran), so its
            # sender may send it elsewhere at once instead of waiting out its timeout.
            if reply_to and self._loop is not None:
                task = self._loop.create_task(self._refuse_unstarted(served, message))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
            return
        if self._running < self.max_concurrency:
            self._start(served, message)
        elif len(self._backlog) < self.max_backlog:
            self._backlog.append((served, message, time.monotonic()))
        else:
            served.counters.rejected += 1
            self._start(served, message, overloaded=True)

    def _drop(self, served: _Served, message: _Message, why: str) -> None:
        """Count a request that must not be answered; say so once a minute at most (anyone
        allowed to publish could send a flood of them)."""
        served.counters.dropped += 1
        count = self._drops.count()
        if count is not None:
            log.warning(
                "%s: a request on %s dropped: %s (%d dropped since the last such line; "
                "$SRV.STATS counts them as dropped_unanswerable)",
                self.name,
                message[0],
                why,
                count,
            )

    def _start(
        self,
        served: _Served,
        message: _Message,
        *,
        overloaded: bool = False,
        queued_s: float = 0.0,
    ) -> None:
        assert self._loop is not None
        if overloaded:
            self._refusing += 1
        else:
            self._running += 1
        served.counters.in_flight += 1
        scope = self._scope_type()
        deadlines = served.deadlines
        deadline = math.inf if overloaded or deadlines is None else deadlines.add(scope)
        task = self._loop.create_task(
            self._handle(served, message, scope, deadline, overloaded, queued_s)
        )
        if not task.done():  # an eager task factory may have run it to its end already
            self._handlers[scope] = task

    async def _handle(
        self,
        served: _Served,
        message: _Message,
        scope: anyio.CancelScope,
        deadline: float,
        overloaded: bool,
        queued_s: float,
    ) -> None:
        started = time.perf_counter_ns()
        try:
            if tracing.enabled():
                # The raw header block: only the trace context is read from it. Every answer,
                # a refusal's or a timeout's too, is sent inside the span, with its context.
                group = served.endpoint.queue_group or "q"
                with tracing.process_span(message[0], message[3], group=group):
                    await self._run(served, message, scope, deadline, overloaded, queued_s)
            else:
                await self._run(served, message, scope, deadline, overloaded, queued_s)
        finally:
            self._handlers.pop(scope, None)
            if served.deadlines is not None:
                served.deadlines.discard(scope)
            self._finish(served, time.perf_counter_ns() - started, overloaded)

    async def _run(
        self,
        served: _Served,
        message: _Message,
        scope: anyio.CancelScope,
        deadline: float,
        overloaded: bool,
        queued_s: float = 0.0,
    ) -> None:
        """Refuse ``message`` (503) when ``overloaded``; else answer it within ``scope`` (504
        past the endpoint's timeout, 503 when a stop cut it)."""
        if overloaded:
            await self._reply_error(served, message[1], Overloaded(self.name))
            return
        with scope:
            await self._answer(served, message, queued_s)
        if scope.cancelled_caught and deadline <= anyio.current_time():
            error = RequestTimeout(f"{served.endpoint.name} timed out")
            await self._reply_error(served, message[1], error)
        elif scope.cancelled_caught and self._closed:  # cut by the stop: say so
            cut = _cut_by_stop(self.name)
            await self._reply_error(served, message[1], cut, outcome_unknown=True)

    async def _refuse(self, served: _Served, message: _Message, error: VaporaError) -> None:
        """Answer ``error`` to a request that never ran, in its ``process`` span if tracing."""
        if tracing.enabled():
            group = served.endpoint.queue_group or "q"
            with tracing.process_span(message[0], message[3], group=group):
                await self._reply_error(served, message[1], error)
        else:
            await self._reply_error(served, message[1], error)

    def _finish(self, served: _Served, elapsed_ns: int, overloaded: bool) -> None:
        micro = served.micro
        micro._processing_time += elapsed_ns
        micro._average_processing_time = micro._processing_time // max(1, micro._num_requests)
        counters = served.counters
        counters.in_flight -= 1
        counters.completed += 1
        if overloaded:  # a refusal frees no handler slot, so it starts nothing from the backlog
            self._refusing -= 1
        else:
            self._running -= 1
            if self._backlog and not self._closed:  # the drain serves the backlog too
                served, message, arrived = self._backlog.popleft()
                self._start(served, message, queued_s=time.monotonic() - arrived)
        if not self.in_flight:
            self._idle.set()

    async def _answer(self, served: _Served, message: _Message, queued_s: float = 0.0) -> None:
        subject, reply_to, data, headers = message
        endpoint = served.endpoint
        try:
            request = self._decode(endpoint, data)
            context = RequestContext(
                nc=self.nc, subject=subject, reply=reply_to, raw_headers=headers, queued_s=queued_s
            )
            reply = await endpoint.handler(request, context)
        except VaporaError as error:
            await self._reply_error(served, reply_to, error)
        except TimeoutError:
            await self._reply_error(served, reply_to, RequestTimeout(f"{endpoint.name} timed out"))
        except Exception:
            log.exception("%s: unhandled error in %s", self.name, endpoint.name)
            await self._reply_error(
                served, reply_to, InternalError("internal error; see the actor log")
            )
        else:
            if reply is not None and reply_to:
                payload = reply if isinstance(reply, bytes) else encode(reply)
                if len(payload) > reply_room(self.nc):
                    # Published, it raised and nobody was answered: the caller waited out its
                    # time while what the handler did (a billed call) was done.
                    log.error(
                        "%s: the %s reply is %d bytes, more than the NATS server carries",
                        self.name,
                        endpoint.name,
                        len(payload),
                    )
                    too_large = InternalError(
                        f"the answer is {len(payload)} bytes, more than the NATS server carries "
                        f"in one message (max_payload {self.nc.max_payload} bytes); a stream "
                        "sends an answer in chunks"
                    )
                    await self._reply_error(served, reply_to, too_large)
                    return
                await self.nc.publish(reply_to, payload, headers=tracing.inject() or None)

    @staticmethod
    def _decode(endpoint: Endpoint[Any], data: bytes) -> Any:
        if not data and _all_optional(endpoint.request_type):  # type: ignore[arg-type]
            data = b"{}"  # `nats req vapora.budget ""`: an empty body asks with every default
        try:
            return decode(data, endpoint.request_type, max_bytes=endpoint.max_bytes)
        except DecodeError as exc:
            if endpoint.decode_error is not None:
                raise endpoint.decode_error(exc) from exc
            raise InvalidRequest(str(exc)) from exc

    def count_error(self, endpoint: str, error: VaporaError) -> None:
        """Count an error a handler answered itself (published to the reply subject directly,
        with headers of its own) in ``$SRV.STATS``, as the errors this service answers are."""
        served = self._served.get(endpoint)
        if served is not None and hasattr(served, "micro"):  # (added once the service runs)
            self._count_error(served, error)

    @staticmethod
    def _count_error(served: _Served, error: VaporaError) -> None:
        counters = served.counters
        counters.errors += 1
        counters.by_code[error.code] = counters.by_code.get(error.code, 0) + 1
        micro = served.micro
        micro._num_errors += 1
        # Cut as the answer's message is: $SRV.STATS carries it (whole, a 600 KB bad field's
        # name made the stats past a 1 MB server's max_payload, unanswerable).
        last = f"{error.status}: {shown_message(error.message)}"
        setattr(micro, "_last_error", last)  # noqa: B010 - typed None

    async def _reply_error(
        self, served: _Served, reply_to: str, error: VaporaError, *, outcome_unknown: bool = False
    ) -> None:
        self._count_error(served, error)
        if reply_to:
            headers = error_headers(error)
            if outcome_unknown:
                headers[OUTCOME_HEADER] = "unknown"
            payload = error_payload(error, stream=served.endpoint.stream)
            await self.nc.publish(reply_to, payload, headers=headers)


@functools.cache
def _all_optional(request_type: type) -> bool:
    """Whether every field of ``request_type`` (a msgspec struct) has a default."""
    try:
        return not any(f.required for f in msgspec.structs.fields(request_type))
    except TypeError:  # not a struct
        return False


class Overloaded(errors.Overloaded):
    """The actor's concurrency and backlog are both full: try again shortly (503)."""

    def __init__(self, actor: str, why: str = "is overloaded; retry shortly") -> None:
        super().__init__(f"{actor} {why}")


def _cut_by_stop(actor: str) -> Overloaded:
    """The answer to a request whose handler a stop cut (the drain's deadline passed, or the
    actor was stopped hard): a 503 like a full backlog's, so the caller may send it elsewhere.
    What it had done is unknown to the caller (``OUTCOME_HEADER``): a provider call cut so is
    recorded as ``cancelled``, its cost unknown."""
    return Overloaded(actor, "stopped before this request finished; retry shortly")


async def _unused_handler(request: MicroRequest) -> None:  # pragma: no cover - never subscribed
    raise AssertionError("vapora endpoints are served by ActorService, not by nats.micro")
