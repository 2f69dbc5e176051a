"""The actor runtime: NATS Services API endpoints that decode, run bounded and answer errors.

An actor declares :class:`Endpoint` s and runs them in an :class:`ActorService`:

* each endpoint is a NATS "micro" endpoint, so ``$SRV.PING/INFO/STATS`` discover and measure it;
* nats-py runs one subscription's callbacks one at a time, so the callback only takes a slot of a
  bounded semaphore and starts the handler as its own task: a handler awaiting I/O never stalls
  the others, and a full actor pushes back instead of growing a queue without bound;
* the body is decoded with the endpoint's typed decoder; a malformed, oversized or invalid message
  is answered with the contract's 400 ``invalid_request`` naming the field, and touches nothing;
* :class:`vapora.errors.VaporaError` s become service-error replies with their contract code; any
  other exception is logged and answered ``500 internal`` without internals;
* trace context is continued from the request headers and injected into every reply;
* :meth:`ActorService.stop` stops taking work, lets in-flight handlers finish within a deadline,
  then cancels what is left.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointConfig, EndpointStats, Service

from actors import tracing
from events.codec import MAX_MESSAGE_BYTES, DecodeError, decode, encode
from events.contract import ErrorBody, ErrorReply
from vapora.errors import InternalError, InvalidRequest, RequestTimeout, VaporaError

__all__ = ["ActorService", "Endpoint", "RequestContext", "error_headers", "error_payload"]

log = logging.getLogger("vapora.actor")

T = TypeVar("T")
Reply = msgspec.Struct | bytes | None
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


@dataclass(kw_only=True)
class RequestContext:
    """What a handler may know about the message it handles, and how to answer more than once."""

    nc: NATS
    subject: str
    reply: str
    headers: Mapping[str, str]

    async def publish(self, subject: str, message: msgspec.Struct | bytes) -> None:
        """Publish to ``subject`` (e.g. stream chunks to the reply subject) with trace context."""
        data = message if isinstance(message, bytes) else encode(message)
        await self.nc.publish(subject, data, headers=tracing.inject())


@dataclass
class _Counters:
    in_flight: int = 0
    completed: int = 0
    errors: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


def error_payload(error: VaporaError) -> bytes:
    """The contract's error body for ``error``."""
    return encode(ErrorReply(error=ErrorBody(code=error.code, message=error.message)))


def error_headers(error: VaporaError) -> dict[str, str]:
    """The NATS Services API error headers for ``error``, plus trace context."""
    headers = {"Nats-Service-Error-Code": str(error.status), "Nats-Service-Error": error.message}
    return tracing.inject(headers)


class ActorService:
    """Serve ``endpoints`` as one NATS micro service until :meth:`stop` or cancellation."""

    def __init__(
        self,
        nc: NATS,
        *,
        name: str,
        endpoints: list[Endpoint[Any]],
        version: str = "0.1.0",
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        max_concurrency: int = 1024,
        drain_timeout: float = 10.0,
    ) -> None:
        self.nc = nc
        self.name = name
        self.endpoints = endpoints
        self.version = version
        self.description = description
        self.metadata = dict(metadata or {})
        self.drain_timeout = drain_timeout
        self._slots = anyio.Semaphore(max_concurrency)
        self._counters = {e.name: _Counters() for e in endpoints}
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._service: Service | None = None

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._counters.values())

    def stop(self) -> None:
        """Ask the service to stop taking work and drain (idempotent, callable from anywhere)."""
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` is called; then drain within ``drain_timeout`` seconds."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            self._service = await self._start_service()
            task_status.started()
            await self._stop.wait()
            await self._service.stop()
            await self._drain()
            task_group.cancel_scope.cancel()

    async def _start_service(self) -> Service:
        service = await add_service(
            self.nc,
            name=self.name,
            version=self.version,
            description=self.description or None,
            metadata=self.metadata or None,
            stats_handler=self._stats,
        )
        for endpoint in self.endpoints:
            await service.add_endpoint(
                EndpointConfig(
                    name=endpoint.name,
                    subject=endpoint.subject,
                    queue_group=endpoint.queue_group,
                    handler=self._dispatcher(endpoint),
                )
            )
        await self.nc.flush()
        return service

    async def _drain(self) -> None:
        with anyio.move_on_after(self.drain_timeout):
            while self.in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self.in_flight:
            log.warning(
                "%s: %d handlers still running after drain; cancelled", self.name, self.in_flight
            )

    def _stats(self, stats: EndpointStats) -> dict[str, Any]:
        counters = self._counters[stats.name]
        return {
            "in_flight": counters.in_flight,
            "completed": counters.completed,
            "errors": counters.errors,
            "errors_by_code": dict(counters.by_code),
        }

    def _dispatcher(self, endpoint: Endpoint[Any]) -> Callable[[MicroRequest], Awaitable[None]]:
        async def dispatch(request: MicroRequest) -> None:
            # Runs inside nats-py's serial callback: only take a slot and hand the work off.
            await self._slots.acquire()
            assert self._task_group is not None
            self._counters[endpoint.name].in_flight += 1
            self._task_group.start_soon(self._handle, endpoint, request._msg)

        return dispatch

    async def _handle(self, endpoint: Endpoint[Any], msg: Msg) -> None:
        counters = self._counters[endpoint.name]
        headers = msg.headers or {}
        try:
            with tracing.process_span(msg.subject, headers, group=endpoint.queue_group or "q"):
                await self._answer(endpoint, msg, headers)
        finally:
            counters.in_flight -= 1
            counters.completed += 1
            self._slots.release()
            if not self.in_flight:
                self._idle.set()

    async def _answer(self, endpoint: Endpoint[Any], msg: Msg, headers: Mapping[str, str]) -> None:
        try:
            request = self._decode(endpoint, msg.data)
            context = RequestContext(
                nc=self.nc, subject=msg.subject, reply=msg.reply, headers=headers
            )
            with anyio.fail_after(endpoint.timeout or math.inf):
                reply = await endpoint.handler(request, context)
        except VaporaError as error:
            await self._reply_error(endpoint, msg, error)
        except TimeoutError:
            await self._reply_error(endpoint, msg, RequestTimeout(f"{endpoint.name} timed out"))
        except Exception:
            log.exception("%s: unhandled error in %s", self.name, endpoint.name)
            await self._reply_error(
                endpoint, msg, InternalError("internal error; see the actor log")
            )
        else:
            if reply is not None and msg.reply:
                data = reply if isinstance(reply, bytes) else encode(reply)
                await self.nc.publish(msg.reply, data, headers=tracing.inject())

    @staticmethod
    def _decode(endpoint: Endpoint[Any], data: bytes) -> Any:
        try:
            return decode(data, endpoint.request_type, max_bytes=endpoint.max_bytes)
        except DecodeError as exc:
            raise InvalidRequest(str(exc)) from exc

    async def _reply_error(self, endpoint: Endpoint[Any], msg: Msg, error: VaporaError) -> None:
        counters = self._counters[endpoint.name]
        counters.errors += 1
        counters.by_code[error.code] = counters.by_code.get(error.code, 0) + 1
        if msg.reply:
            await self.nc.publish(msg.reply, error_payload(error), headers=error_headers(error))
