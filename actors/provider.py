"""The provider actor: one configured provider's HTTP client behind ``vapora.provider.<name>.call``.

Each process running it joins the queue group ``provider-<name>``, so N processes share the calls.
It owns, per process:

* the provider client (:func:`vapora.providers.make_client`, its API key read from the runtime's
  environment and never stored elsewhere);
* a rate limiter: a token bucket from the config's ``rate_limit_rpm`` (ten seconds' worth of
  burst), which a 429's ``retry-after`` (or reset header) closes until the time it names;
* a circuit breaker: opens after ``breaker_threshold`` consecutive provider-side failures
  (transient, timeout, configuration) and at once on an exhausted quota or billing limit (retrying
  will not help), lets one probe through after ``breaker_cooldown_s``
  (half open), closes on the probe's success and reopens on its failure;
* the observed-latency estimate (the client's EWMA).

A call's time limit (``ProviderCall.timeout_ms``) counts from when it reached the actor: one that
waited in the backlog (every handler busy) gets what is left of it, and one whose time ran out
there is answered as not called (``expired_in_queue``) without calling the provider: the router
has given up on it by then, and may be paying another provider for the same task.

Every call appends ``call_succeeded`` or ``call_failed`` plus ``spend_recorded`` (the cost at the
price in force at the call's time, settling ``reservation_id``; a failed call records what the
provider billed, e.g. a broken stream's partial usage), pipelined together. Changes of
availability (rate limited until, breaker open/half open/closed, health check, a latency
estimate that moved by a fifth) are appended as ``provider_health_changed``; the router keeps a
projection of them.

Streams: chunks go straight to the caller's subject (``ProviderCall.stream_to``), in order, with
``seq`` from 0; the reply to the router is the final :class:`ProviderCallResult` or an error.

**Error replies** carry the contract's error body and ``Nats-Service-Error(-Code)`` headers
(502 ``provider_error``) plus these headers, which the router reads to decide on fallback:

====================  ===========================================================================
``Vapora-Error-Class``  the :class:`vapora.errors.ProviderError` class: ``transient``, ``timeout``,
                        ``rate_limited``, ``quota_exhausted``, ``configuration``, ``caller_error``
                        (no fallback), ``context_overflow`` (the input is longer than the
                        model's context window: the next model may take it), ``stream_broken``
                        (failed after the first chunk: no fallback)
``Vapora-Retry-After``  seconds, when the provider (or the local limiter) said how long to wait
``Vapora-Usage``        JSON :class:`events.contract.Usage` the provider billed despite failing
``Vapora-Cost-Usd``     that usage's cost, a decimal string
``Vapora-Http-Status``  the provider's HTTP status, when there was one
``Vapora-Called``       ``1`` when the provider was called, ``0`` when refused locally
``Vapora-Outcome``      ``unknown`` on a timeout after the request was sent (not one connecting),
                        with no usage reported: the provider may still bill it, so the router
                        keeps the attempt's hold (until its spend or its expiry)
====================  ===========================================================================

``durable_reply`` (default on): the router's reply waits until JetStream acknowledged the call's
events, so an answer never outruns its ``spend_recorded``. Off, the events are published ahead of
the reply and acknowledged alongside it (one JetStream round trip less per call; a store failure
is then only logged).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import msgspec
from opentelemetry import context as otel_context

from actors import tracing
from actors.connection import raw_header
from actors.held import HeldEvents
from actors.runner import Runtime
from actors.service import (
    OUTCOME_HEADER,
    ActorService,
    Endpoint,
    RequestContext,
    Sparing,
    error_headers,
    error_payload,
    reply_problem,
    reply_room,
)
from events import subjects
from events.codec import DecodeError, decode, encode, plain_decimal
from events.contract import (
    AttemptsUnbilled,
    BudgetPending,
    BudgetRelease,
    Price,
    ProviderCall,
    StreamCancel,
    StreamChunk,
    Usage,
)
from events.log import (
    HEALTH_HEARTBEAT_S,
    INSTANCE_STOPPED,
    CallFailed,
    CallSucceeded,
    Event,
    ProviderHealthChanged,
    SpendRecorded,
)
from vapora import telemetry
from vapora.config import ProviderConfig, api_key, missing_api_key, redact_url
from vapora.errors import (
    ConfigError,
    InvalidRequest,
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderStreamBroken,
    ProviderUnavailable,
)
from vapora.pricing import (
    cost,
    price_at,
    served_bound,
    served_tier,
    tiers_left_out,
    unsaid_tiers,
)
from vapora.providers import (
    Completion,
    ProviderClient,
    ProviderRequest,
    make_client,
    upper_bound_usage,
)
from vapora.providers.base import default_transport, without_request_text
from vapora.providers.stream import CALLER_CANCELLED, FORWARD_FAILED
from vapora.telemetry import TASK_ID
from vapora.telemetry.genai import CallSpec, ProviderCallTelemetry
from vapora.telemetry.logs import printable

__all__ = [
    "ERROR_CLASS_HEADER",
    "RETRY_AFTER_HEADER",
    "COST_HEADER",
    "ROUTE_REASON_HEADER",
    "SPEND_ID_HEADER",
    "DEADLINE_HEADER",
    "say_pending",
    "USAGE_HEADER",
    "CircuitBreaker",
    "ProviderActor",
    "RateLimiter",
    "ShardedTransport",
]

log = logging.getLogger("vapora.provider")

ERROR_CLASS_HEADER = "Vapora-Error-Class"
RETRY_AFTER_HEADER = "Vapora-Retry-After"
USAGE_HEADER = "Vapora-Usage"
COST_HEADER = "Vapora-Cost-Usd"
HTTP_STATUS_HEADER = "Vapora-Http-Status"
CALLED_HEADER = "Vapora-Called"
#: The provider error's type (an identifier: the provider's error code, or vapora's own such
#: as ``cancelled_by_caller``), when it has one.
ERROR_TYPE_HEADER = "Vapora-Error-Type"
#: Sent by the router with tracing on: why this provider (the provider span's route reason).
ROUTE_REASON_HEADER = "Vapora-Route-Reason"
#: Sent by the router with a call that holds budget: the id (32 lowercase hex digits) the call's
#: ``spend_recorded`` takes, so that a router that stopped waiting for the call knows its spend
#: when it comes. A header, not a field: an older provider actor refuses a call with a field it
#: does not know, and ignores a header.
SPEND_ID_HEADER = "Vapora-Spend-Id"
_SPEND_ID = re.compile(r"[0-9a-f]{32}")
#: Sent by the router with every call: when it stops waiting for the call's answer, in whole
#: milliseconds since the Unix epoch by its clock. A call read past it (an actor paused with
#: the call in its socket, SIGSTOP or ``docker pause``, measures no wait of its own) is refused,
#: not called: nobody waits for it, and the router may be paying another provider for it.
DEADLINE_HEADER = "Vapora-Deadline"
#: How far the routers' and provider actors' clocks may disagree (NTP keeps them well within):
#: a call is refused only this long past its deadline by the actor's clock.
_CLOCK_TOLERANCE_S = 1.0
_DEADLINE = re.compile(r"[0-9]{1,15}")
#: A call with less than this left of its time limit after waiting in the backlog is refused.
_STALE_MARGIN_S = 0.05
#: Seconds a stopping provider actor allows past its timeout for the calls' events to append.
_DRAIN_MARGIN_S = 5.0
#: How many cancels of streams not (yet) streaming here are remembered, and for how long.
_CANCELS_REMEMBERED = 10_000
#: A stream's caller is looked for (see ProviderActor._on_gone) after this long, and again each
#: this long; it is gone once the server has said so this many times.
_PROBE_AFTER_S = 1.0
_PROBE_EVERY_S = 1.0
_GONE_AFTER = 2
_CANCEL_REMEMBERED_S = 600.0

# A 429 without a usable wait closes the provider this long; a huge wait is capped.
_DEFAULT_RETRY_S = 1.0
_MAX_RETRY_S = 3600.0
_BURST_SECONDS = 10.0
_SECOND = timedelta(seconds=1)

BreakerState = Literal["closed", "open", "half_open"]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx's transport as ``shards`` small connection pools; each request goes to the least
    busy one. (The actor now uses :class:`vapora.providers.KeepAliveTransport`, whose pool has
    no scan; this stays for benchmarks that measure httpx's own transport.)

    httpcore 1.0's pool scans every connection on each request and response, once per
    connection (quadratic in the pool's size: ``len([c.is_idle() for c in connections])``
    inside a loop over the connections, each an ``is_socket_readable`` poll for idle ones). At 64
    concurrent calls that scan was the largest cost of a provider actor (profiled with
    ``bench/bench_pipeline.py --profile``); small pools keep it to a few connections.
    """

    def __init__(self, *, max_connections: int = 256, shards: int = 16) -> None:
        per_shard = max(1, -(-max_connections // shards))
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        tls = _tls_context()  # building one costs ~50 ms (CA bundle); share it
        self._shards = [
            httpx.AsyncHTTPTransport(verify=tls, limits=limits, retries=0) for _ in range(shards)
        ]
        self._busy = [0] * shards

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = self._busy.index(min(self._busy))
        self._busy[index] += 1
        try:
            return await self._shards[index].handle_async_request(request)
        finally:
            self._busy[index] -= 1

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class RateLimiter:
    """A token bucket of ``rpm`` requests a minute plus a "closed until" from 429s."""

    def __init__(self, rpm: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = (rpm / 60.0) if rpm else math.inf
        self._capacity = max(1.0, self._rate * _BURST_SECONDS) if rpm else math.inf
        self._tokens = self._capacity
        self._clock = clock
        self._stamp = clock()
        self.closed_until = 0.0

    def take(self) -> float:
        """Take a token: 0.0 when admitted, else the seconds until one is available."""
        now = self._clock()
        if now < self.closed_until:
            return self.closed_until - now
        if self._rate == math.inf:
            return 0.0
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def close_for(self, seconds: float) -> None:
        self.closed_until = max(self.closed_until, self._clock() + seconds)

    def limited(self) -> bool:
        return self._clock() < self.closed_until


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures -> half open after ``cooldown_s``
    (one probe) -> closed on its success, open again on its failure."""

    def __init__(
        self, threshold: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state: BreakerState = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._clock = clock

    def poll(self) -> BreakerState:
        """The state now: an open breaker past its cool-down becomes half open."""
        if self.state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self.state, self._probing = "half_open", False
        return self.state

    def admit(self) -> bool:
        state = self.poll()
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """A call succeeded. An open breaker stays open: the success belongs to a call admitted
        before it opened; only the half-open probe's success closes it."""
        if self.state == "open":
            return
        self.state, self.failures, self._probing = "closed", 0, False

    def trip(self) -> None:
        """Open now, whatever the count (quota or billing exhausted: retrying will not help)."""
        self.failures = max(self.failures, self.threshold)
        self.state, self._opened_at, self._probing = "open", self._clock(), False

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.state, self._opened_at, self._probing = "open", self._clock(), False


@dataclass(frozen=True)
class _HealthSignature:
    available: bool
    reason: str
    breaker: BreakerState
    rate_limited_until: datetime | None


def _new_id() -> str:
    # 128 random bits as 32 hex digits, like ``uuid4().hex`` without building a UUID.
    return os.urandom(16).hex()


# The signature of the usual state, shared, so that "nothing changed" is an identity check.
_AVAILABLE = _HealthSignature(True, "available", "closed", None)


def _counts_against_breaker(error: ProviderError) -> bool:
    # This actor's failure (forwarding), or the caller's choice (it stopped reading): not the
    # provider's.
    if error.error_type in (FORWARD_FAILED, CALLER_CANCELLED):
        return False
    return not isinstance(error, ProviderRejected | ProviderRateLimited)


def _texts(call: ProviderCall) -> list[str]:
    """The request's own text: its prompt, system text and messages."""
    texts = [text for text in (call.prompt, call.system) if text]
    texts.extend(m.content for m in call.messages or () if m.content)
    return texts


#: Room a provider actor's answer leaves in a NATS message for what the router's answer adds to
#: it (the route decision, the attempts).
_ROUTER_ROOM = 64 * 1024


class ProviderActor:
    """Serves ``vapora.provider.<name>.call`` for one configured provider (see the module doc)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        provider: str | None = None,
        breaker_threshold: int | None = None,
        breaker_cooldown_s: float | None = None,
        health_interval_s: float = 5.0,
        max_concurrency: int = 512,
        client: ProviderClient | None = None,
        durable_reply: bool = True,
    ) -> None:
        config = runtime.config.provider(provider or "")
        if config is None:
            raise ConfigError(f"unknown provider {provider!r}")
        self.runtime = runtime
        self.config: ProviderConfig = config
        self.name = f"provider-{config.name}"
        #: This actor process among those serving the provider (its health events say which).
        self.instance = _new_id()
        self.client = client or make_client(
            name=config.name,
            kind=config.kind.value,
            model=config.model,
            price=config.price,
            api_key=api_key(config, runtime.env),
            base_url=config.base_url,
            timeout=config.timeout_ms / 1000,
            # Not httpx's transport: half the actor's CPU went to httpcore (ShardedTransport's
            # docstring); see vapora/providers/transport.py and docs/http-transport.md. But
            # httpx's through a proxy the environment configures (an egress proxy).
            transport=default_transport(config.base_url, max_concurrency),
            **({"service_tier": config.service_tier} if config.service_tier else {}),
        )
        self.limiter = RateLimiter(config.rate_limit_rpm)
        self.breaker = CircuitBreaker(
            breaker_threshold or config.breaker_threshold,
            breaker_cooldown_s or config.breaker_cooldown_ms / 1000,
        )
        self.health_interval_s = health_interval_s
        # The service tiers other than the standard one the provider said it served calls at:
        # a call whose cost is not known is recorded at the dearest of their rates and the
        # standard ones. From the start, the tiers a call may be served at before any is said,
        # as the router bounds its hold (``pricing.unsaid_tiers``: the tier the config asks for,
        # else every tier the table has for the model): such a call recorded at the standard
        # rates settled the router's hold below a priority bill, and released the rest.
        self._served_tiers: set[str] = set(
            unsaid_tiers(config.kind.value, config.model, config.service_tier)
        )
        self._healthy: tuple[bool, str] = (True, "")
        self._published: _HealthSignature | None = None
        self._published_latency: float | None = None
        self._published_at = 0.0  # monotonic time of the last health event stored
        self._stop = anyio.Event()
        #: Streams in flight by the subject their chunks go to, to stop on the caller's word
        #: (``vapora.stream.cancel``); and the subjects cancelled before their call came.
        self._streaming: dict[str, anyio.CancelScope] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._bad_cancels = Sparing()  # messages on vapora.stream.cancel that were not cancels
        #: Where the server says a stream's caller no longer listens (None: not looked for),
        #: and how many times it said so, by stream (:meth:`_on_gone`).
        self._gone_subject: str | None = None
        self._gone: dict[str, int] = {}
        self.durable_reply = durable_reply
        self._task_group: anyio.abc.TaskGroup | None = None
        #: A call's events the event log did not take, kept on disk and appended again every
        #: ``held_retry_s`` (:mod:`actors.held`).
        self.held = HeldEvents(runtime.data_dir, self.name, kin="provider-")
        self.held_retry_s = 2.0
        self.adopt_every = 5  # held_retry_s ticks between looks for a dead instance's files
        # Without its API key an instance takes no calls (each would fail, and the queue group
        # would hand it a share of them while another instance serves with the key): it still
        # answers $SRV.PING and says in its health event that the key is missing.
        self.key_missing = missing_api_key(config, runtime.env)
        calls = Endpoint(
            name="call",
            subject=subjects.provider_call(config.name),
            request_type=ProviderCall,
            handler=self._call,
            queue_group=self.name,
            timeout=None,
            needs_reply=True,
        )
        self.service = ActorService(
            runtime.nc,
            name=self.name,
            reserved_replies=(runtime.log.settings.prefix + ".",),
            endpoints=[calls] if self.key_missing is None else [],
            description=f"calls to {config.name} ({config.kind.value}, {config.model})",
            max_concurrency=max_concurrency,
            # A stop lets the calls in flight end (each within the provider's timeout) and their
            # spend be appended: cut short, a call's cost would never reach the log.
            drain_timeout=max(10.0, config.timeout_ms / 1000 + _DRAIN_MARGIN_S),
        )

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def stop_timeout_s(self) -> float:
        """How long a stop may take: the drain of the calls in flight, the last try at the held
        events and closing the client (each bounded below), and a margin."""
        return self.service.drain_timeout + 5 + 5 + _DRAIN_MARGIN_S

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Check health, announce it, serve until :meth:`stop`, then drain and close the client."""
        try:
            await self._load_held()
            if self.key_missing is not None:
                log.warning("%s: %s: it takes no calls", self.name, self.key_missing)
            config = self.config
            left_out = tiers_left_out(
                config.kind.value, config.model, config.price, self.runtime.clock()
            )
            if left_out is not None:
                log.warning("%s: %s", self.name, left_out)
            await self._check_health()
            await self._publish_health(force=True)
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._health_loop)
                tg.start_soon(self._held_loop)
                async with anyio.create_task_group() as serving:
                    # Every instance hears every cancel: the one streaming to it stops.
                    cancels = await self.runtime.nc.subscribe(
                        subjects.STREAM_CANCEL, cb=self._on_cancel
                    )
                    await self._listen_for_gone_callers()
                    await serving.start(self.service.run)
                    task_status.started()
                    await self._stop.wait()
                    self.service.stop()  # drains in-flight calls, then service.run returns
                # After the drain: a caller that stops reading meanwhile is still heard.
                with contextlib.suppress(Exception):
                    await cancels.unsubscribe()
                await self._publish_stopped()
                tg.cancel_scope.cancel()
        finally:
            if self.held:  # a last try; what is left stays on disk for the next start
                with anyio.move_on_after(5, shield=True):
                    await self._append_held()
                if self.held:
                    log.error(
                        "%s: stopped with %d events the event log never took; kept in %s for "
                        "the next start",
                        self.name,
                        len(self.held),
                        self.held.path,
                    )
            self.held.close()
            with anyio.move_on_after(5, shield=True):
                await self.client.aclose()

    def stop(self) -> None:
        self._stop.set()

    async def _on_cancel(self, message: Any) -> None:
        """``vapora.stream.cancel``: stop the stream going to ``stream_to`` if this instance
        has it; else remember it a while, in case its call has not reached an actor yet."""
        try:
            cancel = decode(message.data, StreamCancel)
        except DecodeError as exc:
            # Anyone may publish here: said once a minute at most, its text cut short (a
            # message of 300,000 characters was written whole, by every provider actor).
            count = self._bad_cancels.count()
            if count is not None:
                log.warning(
                    "%s: a stream cancel that is not one: %s (%d such messages since the last "
                    "such line)",
                    self.name,
                    printable(str(exc)[:300]),
                    count,
                )
            return
        scope = self._streaming.get(cancel.stream_to)
        if scope is not None:
            if tracing.enabled():  # in the stream's trace (the caller's publish of the cancel)
                with tracing.process_span(subjects.STREAM_CANCEL, message.headers):
                    scope.cancel()
            else:
                scope.cancel()
            return
        now = time.monotonic()
        cancelled = self._cancelled
        cancelled.pop(cancel.stream_to, None)  # said again: the most recent, forgotten last
        cancelled[cancel.stream_to] = now
        while cancelled and (
            len(cancelled) > _CANCELS_REMEMBERED
            or next(iter(cancelled.values())) < now - _CANCEL_REMEMBERED_S
        ):
            cancelled.popitem(last=False)

    async def _listen_for_gone_callers(self) -> None:
        """Subscribe to where the server answers a chunk nobody listens for (see _on_gone)."""
        nc = self.runtime.nc
        if not hasattr(nc, "subscribe_raw"):  # a plain client (tests): no one is looked for
            return
        subject = f"{nc.new_inbox()}.gone"
        await nc.subscribe_raw(subject, self._on_gone)
        self._gone_subject = subject

    def _on_gone(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """The server's 503 for a chunk sent with our reply subject: nobody listens on the
        stream's subject (``Nats-Subject``) any more. A caller that goes away without a cancel
        (killed, its network lost) was not noticed: NATS tells a publisher nothing, and the
        provider generated to the end of the answer, billed for text nobody read. Said twice
        (a second chunk, a second later, found nobody either), the stream is stopped as a
        cancel stops it, and what was received is billed."""
        if not headers or not headers.startswith(b"NATS/1.0 503"):
            return
        stream_to = raw_header(headers, "Nats-Subject")
        if stream_to is None or stream_to not in self._streaming:
            return
        said = self._gone[stream_to] = self._gone.get(stream_to, 0) + 1
        if said >= _GONE_AFTER:
            log.info(
                "%s: nobody reads the stream to %s any more: stopping it", self.name, stream_to
            )
            self._streaming[stream_to].cancel()

    def _cancelled_before(self, stream_to: str) -> bool:
        when = self._cancelled.pop(stream_to, None)
        return when is not None and when >= time.monotonic() - _CANCEL_REMEMBERED_S

    # --- one call -----------------------------------------------------------------------------

    async def _call(self, call: ProviderCall, ctx: RequestContext) -> bytes | None:
        TASK_ID.set(call.task_id)
        if call.stream_to is not None:  # checked before the provider is paid for a stream
            problem = reply_problem(call.stream_to, self.service.reserved_replies)
            if problem is not None:
                raise InvalidRequest(f"`stream_to` {call.stream_to[:64]!r} {problem}")
        stale = _stale(call, ctx.queued_s, self.config.name) or _past_deadline(
            ctx.header(DEADLINE_HEADER), self.config.name
        )
        if stale is not None:
            await self._reply_error(ctx, stale, called=False)
            self._give_back_unbilled(call, "not_called", ctx)
            return None
        if call.stream_to is not None and self._cancelled_before(call.stream_to):
            # Its caller stopped reading before the call came: not called, and no fallback
            # (a stream_broken error ends the task: nobody waits for another provider).
            gone = ProviderStreamBroken(
                f"{self.config.name}: the caller stopped reading the stream before it began; "
                "not called",
                provider=self.config.name,
                error_type=CALLER_CANCELLED,
            )
            await self._reply_error(ctx, gone, called=False)
            self._give_back_unbilled(call, "not_called", ctx)
            return None
        refusal = self._admit()
        if refusal is not None:
            await self._publish_health()
            await self._reply_error(ctx, refusal, called=False)
            self._give_back_unbilled(call, "not_called", ctx)
            return None
        # Priced at the call's time (DESIGN §4): a table price may have changed since the start.
        # The call's own price: other calls of this actor run at the same time.
        config = self.config
        now = self.runtime.clock()
        price = price_at(config.kind.value, config.model, config.price, now)
        request = ProviderRequest.from_call(call, price)
        # The dearer rates of a service tier the provider said it serves at, for a call whose
        # cost is not known (what it bills is at that tier's rates).
        bound_price = price
        if self._served_tiers:
            kind = config.kind.value
            bound_price = served_bound(kind, config.model, price, self._served_tiers, now)
        # What the call is recorded as should this actor die before it ends, on disk before
        # the provider has it (the instance that adopts a dead one's files appends it). The
        # call's own events take its ids, so that they replace it wherever both are found.
        spend_id = _spend_id(ctx)  # (None: the actor's own id)
        unended = self._unended(call, request, bound_price, spend_id)
        self.held.begin(unended)
        started = time.perf_counter()
        try:
            if telemetry.active():
                done = await self._observed(call, request, ctx)
            else:
                done = await self._send(call, request, ctx)
        except anyio.get_cancelled_exc_class():
            self._cut(call, (time.perf_counter() - started) * 1000, unended)
            raise
        except ProviderError as error:
            latency_ms = (time.perf_counter() - started) * 1000
            if error.price is None and error.usage_estimated:
                error.price = bound_price if bound_price is not price else None
            self._note_tier(error.price)
            await self._failed(call, error, latency_ms, price, unended)
            await self._reply_error(ctx, error, called=True, price=price)
            if not _has_tokens(error.usage):
                self._give_back_unbilled(call, "failed", ctx)
            return None
        except Exception as exc:  # a bug of ours, mid-call: the provider may have billed it
            latency_ms = (time.perf_counter() - started) * 1000
            message = (
                f"{self.config.name}: the call failed inside vapora ({type(exc).__name__}); what "
                "the provider billed for it is unknown: recorded at the attempt's upper bound"
            )
            failed = msgspec.structs.replace(
                unended[0],
                error_code="internal",
                error_class="internal",
                message=message,
                latency_ms=latency_ms,
            )
            await self._record([failed, unended[1]])
            raise
        await self._succeeded(call, done, unended)
        result = done.to_call_result()
        if call.stream_to:  # the text went to the caller in chunks: the router needs the rest
            return encode(msgspec.structs.replace(result, text=""))
        reply = encode(result)
        if len(reply) > reply_room(ctx.nc) - _ROUTER_ROOM:
            # Too large for one NATS message (the router's answer adds its route to it): the
            # call is billed and recorded; said to the caller as such, with no fallback (the
            # next provider's answer would be as long, and paid for again).
            too_large = ProviderRejected(
                f"{self.config.name}: the answer is {len(reply)} bytes, more than the NATS "
                f"server carries in one message (max_payload {ctx.nc.max_payload} bytes); "
                "vapora.stream sends it in chunks, or ask for fewer max_tokens",
                provider=self.config.name,
                error_type="answer_too_large",
                usage=done.usage,
            )
            await self._reply_error(ctx, too_large, called=True, price=done.price)
            return None
        return reply

    def _admit(self) -> ProviderError | None:
        """None when the call may go ahead; else why not (rate limit or breaker)."""
        wait = self.limiter.take()
        if wait > 0:
            if not self.limiter.limited():
                self.limiter.close_for(wait)
            return ProviderRateLimited(
                f"{self.config.name}: rate limited for {wait:.3f} s",
                retry_after=wait,
                provider=self.config.name,
                error_type="local_rate_limit",
            )
        if not self.breaker.admit():
            return ProviderUnavailable(
                f"{self.config.name}: circuit breaker {self.breaker.state.replace('_', ' ')}",
                provider=self.config.name,
                error_type="breaker_open",
            )
        return None

    async def _observed(
        self, call: ProviderCall, request: ProviderRequest, ctx: RequestContext
    ) -> Completion:
        """The call inside its GenAI span and metrics (:mod:`vapora.telemetry.genai`)."""
        spec = CallSpec.of(
            self.client,
            request,
            task_id=call.task_id,
            task_type=call.task_type.value,
            attempt=call.attempt,
            stream=call.stream_to is not None,
            # Only the call's span records it: read when there is one to record.
            route_reason=ctx.header(ROUTE_REASON_HEADER) if tracing.recording() else None,
        )
        with ProviderCallTelemetry(spec) as observed:
            done = await self._send(call, request, ctx)
            observed.succeeded(done)
        return done

    async def _send(
        self, call: ProviderCall, request: ProviderRequest, ctx: RequestContext
    ) -> Completion:
        try:
            if call.stream_to:
                return await self._stream(call, request, ctx)
            return await self.client.complete(request, time_limit=_time_left(call, ctx.queued_s))
        except ProviderError as error:
            # Before the error reaches the call's span, its events, the logs and the caller:
            # a provider may quote the request's text in it.
            raise without_request_text(error, _texts(call)) from error.__cause__

    async def _stream(
        self, call: ProviderCall, request: ProviderRequest, ctx: RequestContext
    ) -> Completion:
        assert call.stream_to is not None
        limit = _time_left(call, ctx.queued_s)
        first = _first_token_left(call, ctx.queued_s)
        async with self.client.stream(request, time_limit=limit, first_token_limit=first) as stream:
            seq = 0
            # The caller may stop reading (vapora.stream.cancel): the provider's generation
            # is stopped with the stream, and what was received is billed.
            # A chunk now and then goes with a reply subject: if nobody listens on the stream's
            # subject, the server answers there (a 503), and the caller is gone (_on_gone).
            look_at = time.monotonic() + _PROBE_AFTER_S if self._gone_subject else math.inf
            with anyio.CancelScope() as caller:
                self._streaming[call.stream_to] = caller
                try:
                    async for text in stream:
                        reply = ""
                        if look_at <= (now := time.monotonic()):
                            reply, look_at = self._gone_subject or "", now + _PROBE_EVERY_S
                        try:
                            chunk = StreamChunk(task_id=call.task_id, seq=seq, text=text)
                            await ctx.publish(call.stream_to, chunk, reply=reply)
                        except Exception as exc:  # NATS closed, its buffer full: billed
                            raise stream.abandoned(exc) from exc
                        seq += 1
                finally:
                    self._streaming.pop(call.stream_to, None)
                    self._gone.pop(call.stream_to, None)
            if caller.cancelled_caught:
                raise stream.cancelled()
        assert stream.completion is not None
        return stream.completion

    # --- outcomes -----------------------------------------------------------------------------

    async def _succeeded(self, call: ProviderCall, done: Completion, unended: list[Event]) -> None:
        self.breaker.success()
        self._note_tier(done.price)
        now = self.runtime.clock()
        succeeded = CallSucceeded(
            id=unended[0].id,
            at=now,
            task_id=call.task_id,
            provider=self.config.name,
            model=done.model,
            attempt=call.attempt,
            usage=done.usage,
            cost_usd=done.cost_usd,
            latency_ms=done.latency_ms,
            first_token_ms=done.first_token_ms,
            finish_reason=done.finish_reason,
            stream=call.stream_to is not None,
            usage_estimated=True if done.usage_estimated else msgspec.UNSET,
        )
        spend = self._spend(
            call, done.model, done.usage, done.cost_usd, now, done.price, unended[1].id
        )
        if done.usage_estimated:
            spend = msgspec.structs.replace(spend, usage_estimated=True)
        events: list[Event] = [succeeded, spend]
        await self._record(events)
        await self._publish_health()

    async def _failed(
        self,
        call: ProviderCall,
        error: ProviderError,
        latency_ms: float,
        price: Price,
        unended: list[Event],
    ) -> None:
        if isinstance(error, ProviderRateLimited):
            self.limiter.close_for(min(error.retry_after or _DEFAULT_RETRY_S, _MAX_RETRY_S))
        if isinstance(error, ProviderQuotaExhausted):
            self.breaker.trip()
        elif _counts_against_breaker(error):
            self.breaker.failure()
        else:
            self.breaker.success()
        now = self.runtime.clock()
        price = error.price or price  # the service tier the provider said, before it failed
        billed = cost(error.usage, price)
        events: list[Event] = [
            CallFailed(
                id=unended[0].id,
                at=now,
                task_id=call.task_id,
                provider=self.config.name,
                model=call.model or self.config.model,
                attempt=call.attempt,
                error_code=error.error_type or error.error_class,
                error_class=error.error_class,
                message=error.message,
                status=error.http_status,
                latency_ms=latency_ms,
                usage=error.usage,
                cost_usd=billed,
                # A chunk forwarded (a cancel may break a stream before its first one).
                after_first_chunk=bool(getattr(error, "partial_text", "")),
            )
        ]
        ending: list[Event] = []
        if billed > 0 or _has_tokens(error.usage):
            model = call.model or self.config.model
            spend = self._spend(call, model, error.usage, billed, now, price, unended[1].id)
            if error.usage_estimated:  # a bound (a time-out, a cut): said, as for an answer
                spend = msgspec.structs.replace(spend, usage_estimated=True)
            events.append(spend)
        else:
            ending = [unended[1]]  # nothing billed: the spend written ahead is no longer due
        await self._record(events, ending=ending)
        await self._publish_health()

    def _cut(self, call: ProviderCall, latency_ms: float, unended: list[Event]) -> None:
        """The call was cancelled while the provider had it (a second stop signal, a drain past
        its limit): recorded as :meth:`_unended` says (a ``call_failed`` of class
        ``cancelled`` and a spend at the attempt's upper bound), held (on disk at once,
        appended by the stop's last try or the next start), since nothing here may await."""
        log.warning(
            "%s: call for task %s (attempt %d) cut by a stop after %.0f ms; recorded as "
            "cancelled, at its upper bound",
            self.name,
            call.task_id,
            call.attempt,
            latency_ms,
        )
        cut = [msgspec.structs.replace(unended[0], latency_ms=latency_ms), unended[1]]
        if self.held.hold(cut, _traces(cut)):
            self.held.end(unended)  # held on disk now: no longer on their way
        # (Else in memory only: still on their way in the write-ahead file, for an adopter.)

    def _give_back_unbilled(self, call: ProviderCall, reason: str, ctx: RequestContext) -> None:
        """Release ``call``'s reservation (in the background; the keeper ignores an id it does
        not hold, a lease's or one already closed), and tell the routers the spend its router
        named will not come (``vapora.budget.unbilled``): a call that ended with nothing
        billed, or was not made. Its router gives the hold back too when it hears the answer;
        but a router that stopped waiting (the actor stalled, the call sat in its backlog)
        keeps a silent attempt's hold, a reservation or the lease it was admitted against,
        from expiring until it sees the attempt's spend, its release or this word, up to an
        hour, and this actor cannot tell whether it still waits (a call read after a pause
        looks fresh): without this, a stall whose backlog then failed unbilled locked the
        budget's room for that hour."""
        if call.reservation_id is None or self._task_group is None:
            return
        release = BudgetRelease(reservation_id=call.reservation_id, reason=reason)
        spend_id = _spend_id(ctx)
        unbilled = AttemptsUnbilled(spend_ids=[spend_id]) if spend_id is not None else None

        async def send() -> None:  # (in the call's context: its trace goes on)
            if unbilled is not None:
                with contextlib.suppress(Exception):  # best effort, as the release
                    await self.runtime.nc.publish(subjects.BUDGET_UNBILLED, encode(unbilled))
            with (
                contextlib.suppress(Exception),  # best effort: the hold expires otherwise
                tracing.request_span(subjects.BUDGET_RELEASE) as headers,
            ):
                await self.runtime.nc.request(
                    subjects.BUDGET_RELEASE,
                    encode(release),
                    timeout=_GIVE_BACK_TIMEOUT_S,
                    headers=headers,
                )

        self._task_group.start_soon(send)

    def _note_tier(self, price: Price | None) -> None:
        """The service tier ``price`` is for (its ``source`` names it), as the provider said it
        served a call: kept while this actor runs (see :meth:`RouterActor._note_tier`)."""
        tier = served_tier(price) if price is not None else None
        if tier is not None and len(self._served_tiers) < 8:
            self._served_tiers.add(tier)

    def _unended(
        self, call: ProviderCall, request: ProviderRequest, price: Price, spend_id: str | None
    ) -> list[Event]:
        """What a call that never ends here (this actor killed or stopped during it, or a bug
        of ours) is recorded as: a ``call_failed`` of class ``cancelled`` and a spend at the
        attempt's upper bound, its whole input and output limit (the provider may have billed
        all of it, and what it billed is not known). Never less than it may have cost: a
        budget is not freed of money the provider may have taken. The input is priced at the
        input rate: vapora asks no provider to write its cache (no ``cache_control``), so no
        input token of its calls is billed at a cache write's dearer rate. The call's own
        events take these ids (:meth:`_record`)."""
        model = call.model or self.config.model
        usage = upper_bound_usage(request, model)
        amount = cost(usage, price)
        now = self.runtime.clock()
        failed = CallFailed(
            id=_new_id(),
            at=now,
            task_id=call.task_id,
            provider=self.config.name,
            model=model,
            attempt=call.attempt,
            error_code="cancelled",
            error_class="cancelled",
            message=f"{self.config.name}: the provider actor stopped during the call; what "
            "the provider billed for it is unknown: recorded at the attempt's upper bound",
            latency_ms=0.0,
            usage=usage,
            cost_usd=amount,
        )
        spend = self._spend(call, model, usage, amount, now, price, spend_id)
        return [failed, msgspec.structs.replace(spend, usage_estimated=True)]

    def _spend(
        self,
        call: ProviderCall,
        model: str,
        usage: Usage,
        amount: Decimal,
        now: datetime,
        price: Price,
        event_id: str | None = None,
    ) -> SpendRecorded:
        return SpendRecorded(
            id=event_id or _new_id(),
            at=now,
            task_id=call.task_id,
            task_type=call.task_type,
            provider=self.config.name,
            model=model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
            cost_usd=amount,
            price=price,
            reservation_id=call.reservation_id,
            attempt=call.attempt,
        )

    async def _record(self, events: list[Event], *, ending: list[Event] | None = None) -> None:
        """Append a call's events: before the reply (``durable_reply``), or alongside it.
        They replace what the call was written ahead as (:meth:`_unended`, the same ids);
        ``ending``: those of it no event replaces (a spend when nothing was billed)."""
        append = functools.partial(self._append, events, hold=True, ending=ending)
        if self.durable_reply or self._task_group is None:
            await append()
        else:
            self._task_group.start_soon(append)
            await anyio.lowlevel.checkpoint()  # published ahead of the reply

    async def _append(
        self, events: list[Event], *, hold: bool = False, ending: list[Event] | None = None
    ) -> bool:
        """Whether ``events`` were stored (a failure is logged, never raised). With ``hold``
        (a call's events: what it cost), events the log did not take are held back, on disk,
        and appended again until it takes them (:meth:`_append_held`): spend is never dropped."""
        # On disk before the log has them: a process killed meanwhile loses none (without
        # their trace, found after a crash: new traces). Encoded once, for both.
        if ending:
            # Said in the same write as the events: a kill leaves both or neither.
            self.held.end(ending)
        payloads = self.held.begin(events) if hold else None
        try:
            await self.runtime.log.append_many(events, payloads=payloads)
        except anyio.get_cancelled_exc_class():
            # Cut by a stop before the log answered: held, appended again later (and still on
            # their way, in the write-ahead file, if the held file refused them).
            if hold and self.held.hold(events, _traces(events)):
                self.held.end(events)
            raise
        except Exception as exc:
            if hold:
                if self.held.hold(events, _traces(events)):
                    self.held.end(events)
                await self._announce_held()
                log.error(
                    "%s: the event log did not take %d events (%s); held back, %d in all, "
                    "appended again until it does",
                    self.name,
                    len(events),
                    exc,
                    len(self.held),
                )
            else:
                log.exception("%s: could not append %d events", self.name, len(events))
            return False
        if hold:
            self.held.end(events)
        return True

    async def _append_held(self) -> bool:
        """Append the events held back, in order, once (True: none left). Appending one again
        is harmless: the stream drops a repeat within its duplicate window, and the budget
        fold and the ledger count an event id once."""
        events = list(self.held)
        if not events:
            return True
        # In runs of one trace context each: each run continues its task's trace.
        for _, run in itertools.groupby(events, key=lambda e: _key(self.held.trace_of(e))):
            group = list(run)
            trace = self.held.trace_of(group[0])
            token = otel_context.attach(tracing.extract(trace)) if trace else None
            try:
                await self.runtime.log.append_many(group)
            except Exception as exc:
                log.warning(
                    "%s: %d held events still not taken (%s)", self.name, len(self.held), exc
                )
                return False
            finally:
                if token is not None:
                    otel_context.detach(token)
            self.held.taken(len(group))
            self.held.end(group)  # on their way since a hold the disk refused, if so
        log.info("%s: appended %d held events", self.name, len(events))
        return not self.held

    async def _held_loop(self) -> None:
        """Every ``held_retry_s``: append what is held; every ``adopt_every`` of those, adopt
        what an instance of any provider that died left in the data directory (its sibling
        instances, if it has any, live on, so no start would come to adopt it; and until it
        is in the log, the keeper's holds for it may expire)."""
        ticks = 0
        while True:
            await anyio.sleep(self.held_retry_s)
            ticks += 1
            self.held.flush()  # the write-ahead file says which calls are done, within 2 s
            if ticks % self.adopt_every == 0 and self.held.adopt():
                log.info("%s: adopted events held by an instance that died", self.name)
            if self.held:
                await self._announce_held()
                await self._append_held()

    async def _announce_held(self) -> None:
        """Tell the budget keeper which holds' spend is held here (``vapora.budget.pending``),
        so that it expires none of them before the log takes the spend. Best effort: core NATS,
        no reply; said again with every retry."""
        holds = sorted(
            {
                e.reservation_id
                for e in self.held
                if isinstance(e, SpendRecorded) and e.reservation_id is not None
            }
        )
        await say_pending(self.runtime.nc, holds)

    async def _load_held(self) -> None:
        """Events earlier instances held and did not append (stopped or crashed during an event
        log outage): adopted, and appended before serving."""
        count = self.held.adopt()
        if count:
            log.info("%s: %d events held by an earlier run, appending them", self.name, count)
            await self._append_held()

    async def _reply_error(
        self,
        ctx: RequestContext,
        error: ProviderError,
        *,
        called: bool,
        price: Price | None = None,
    ) -> None:
        self.service.count_error("call", error)  # in $SRV.STATS, as the service's own are
        if not ctx.reply:
            return
        # A caller's cancel fails nothing: its span is not failed (the call's own says why).
        headers = error_headers(error, failed=error.error_type != CALLER_CANCELLED)
        headers[ERROR_CLASS_HEADER] = error.error_class
        headers[CALLED_HEADER] = "1" if called else "0"
        if error.error_type:
            headers[ERROR_TYPE_HEADER] = error.error_type
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            headers[RETRY_AFTER_HEADER] = f"{retry_after:.3f}"
        if error.http_status is not None:
            headers[HTTP_STATUS_HEADER] = str(error.http_status)
        if _has_tokens(error.usage):
            headers[USAGE_HEADER] = encode(error.usage).decode()
            billed_at = error.price or price or self.client.price
            headers[COST_HEADER] = plain_decimal(cost(error.usage, billed_at))
        elif called and _maybe_billed(error):
            # The provider had the request when the time ran out: it may finish it and bill
            # it. What it billed is unknown here, so the router keeps the attempt's hold.
            headers[OUTCOME_HEADER] = "unknown"
        await ctx.nc.publish(ctx.reply, error_payload(error), headers=headers)

    # --- health -------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await anyio.sleep(self.health_interval_s)
            try:
                await self._check_health()
                # Said again now and then, unchanged: a router that starts reads the last
                # INSTANCE_FORGOTTEN_S of health events and finds every live instance there.
                quiet = time.monotonic() - self._published_at >= HEALTH_HEARTBEAT_S
                await self._publish_health(latency=True, force=quiet)
            except Exception:
                log.exception("%s: health check failed", self.name)

    async def _check_health(self) -> None:
        missing = missing_api_key(self.config, self.runtime.env)
        if missing is not None:
            self._healthy = (False, missing)
            return
        with anyio.move_on_after(max(self.health_interval_s, 2.0)) as scope:
            ok = await self.client.available()
        if scope.cancelled_caught:
            ok = False
        where = redact_url(self.config.base_url)  # which server, for the operator
        self._healthy = (ok, "" if ok else f"health check failed: no healthy answer from {where}")

    def _signature(self) -> _HealthSignature:
        breaker = self.breaker.poll()
        healthy, reason = self._healthy
        until: datetime | None = None
        if self.limiter.limited():
            wait = self.limiter.closed_until - time.monotonic()
            until = self.runtime.clock() + timedelta(seconds=max(wait, 0.0))
        if not healthy:
            return _HealthSignature(False, reason, breaker, until)
        if breaker == "open":
            return _HealthSignature(False, "circuit breaker open", breaker, until)
        if until is not None:
            return _HealthSignature(False, "rate limited", breaker, until)
        if breaker == "closed":
            return _AVAILABLE
        return _HealthSignature(True, "probing (breaker half open)", breaker, None)

    async def _publish_health(self, *, force: bool = False, latency: bool = False) -> None:
        """Append ``provider_health_changed`` if availability changed (or, from the periodic
        check only, the latency estimate moved by more than a fifth)."""
        signature = self._signature()
        if signature is self._published and not (force or latency):
            return  # after every call: the usual case, decided without building anything
        estimate = self.client.latency_estimate()
        if not force and not self._changed(signature, estimate if latency else None):
            return
        before = (self._published, self._published_latency)
        self._published = signature
        if latency or force:
            self._published_latency = estimate
        event = ProviderHealthChanged(
            id=_new_id(),
            at=self.runtime.clock(),
            provider=self.config.name,
            available=signature.available,
            reason=signature.reason,
            breaker=signature.breaker,
            rate_limited_until=signature.rate_limited_until,
            latency_estimate_ms=estimate,
            instance=self.instance,
        )
        if not await self._append([event]) and self._published is signature:
            # Not stored: the routers never saw it. The next check publishes it again (else a
            # recovery during a log outage would keep the provider out of routing for good).
            self._published, self._published_latency = before
        else:
            self._published_at = time.monotonic()

    async def _publish_stopped(self) -> None:
        """This instance's last word: it leaves (routers forget what it said; the provider's
        availability is the other instances' to say)."""
        event = ProviderHealthChanged(
            id=_new_id(),
            at=self.runtime.clock(),
            provider=self.config.name,
            available=True,
            reason=INSTANCE_STOPPED,
            instance=self.instance,
        )
        with anyio.move_on_after(2, shield=True):
            await self._append([event])

    def _changed(self, signature: _HealthSignature, latency: float | None) -> bool:
        old = self._published
        if old is None:
            return True
        same_state = (old.available, old.reason, old.breaker) == (
            signature.available,
            signature.reason,
            signature.breaker,
        )
        if not same_state:
            return True
        new_until, old_until = signature.rate_limited_until, old.rate_limited_until
        if new_until is not None and old_until is not None and new_until > old_until + _SECOND:
            return True
        return _latency_moved(self._published_latency, latency)


def _latency_moved(old: float | None, new: float | None) -> bool:
    if new is None:
        return False
    if old is None:
        return True
    return abs(new - old) > 0.2 * max(old, 1.0)


#: How long a provider actor waits for the keeper to take a release it sends (best effort).
_GIVE_BACK_TIMEOUT_S = 5.0


async def say_pending(nc: Any, holds: Sequence[str]) -> None:
    """Tell the budget keeper that ``holds`` (reservation or lease ids) have spend on its way
    (``vapora.budget.pending``): it expires none of them for a minute. Best effort: core NATS,
    no reply, said again by the callers."""
    for start in range(0, len(holds), 1000):
        with contextlib.suppress(Exception):
            pending = BudgetPending(holds=list(holds[start : start + 1000]))
            await nc.publish(subjects.BUDGET_PENDING, encode(pending))


def _time_left(call: ProviderCall, queued_s: float) -> float | None:
    """The call's time limit in seconds, less what it waited in this actor's backlog: the
    router's wait (and its hold's life) counts from when it sent the call."""
    return call.timeout_ms / 1000 - queued_s if call.timeout_ms else None


def _first_token_left(call: ProviderCall, queued_s: float) -> float | None:
    """A stream's time to its first token in seconds, less what it waited in this actor's
    backlog: the caller's latency requirement counts from when the router sent the call."""
    if not call.first_token_timeout_ms:
        return None
    return call.first_token_timeout_ms / 1000 - queued_s


def _stale(call: ProviderCall, queued_s: float, provider: str) -> ProviderError | None:
    """A call that waited in the backlog past its time limit (or a stream, past its time to
    the first token): the router has given up on it, or is about to (and may be paying another
    provider for it); calling the provider now would bill a call nobody waits for, perhaps
    after its hold expired. Refused, not called."""
    if not queued_s:
        return None  # (a call that never waited keeps its whole limit, however short)
    limits = [(_time_left(call, queued_s), "time limit", call.timeout_ms)]
    if call.stream_to is not None:
        first_ms = call.first_token_timeout_ms
        limits.append((_first_token_left(call, queued_s), "time to first token", first_ms))
    for left, what, limit_ms in limits:
        if left is not None and left <= _STALE_MARGIN_S:
            return ProviderUnavailable(
                f"{provider}: the call waited {queued_s:.1f} s for this provider actor, past "
                f"its {what} ({limit_ms} ms); not called",
                provider=provider,
                error_type="expired_in_queue",
            )
    return None


def _spend_id(ctx: RequestContext) -> str | None:
    """The call's ``Vapora-Spend-Id``, if it is one of a router's (32 lowercase hex digits)."""
    spend_id = ctx.header(SPEND_ID_HEADER)
    return spend_id if spend_id is not None and _SPEND_ID.fullmatch(spend_id) else None


def _past_deadline(deadline: str | None, provider: str) -> ProviderError | None:
    """A call read when its router had stopped waiting for it (its ``Vapora-Deadline``, by
    this actor's clock, less :data:`_CLOCK_TOLERANCE_S`): the backlog's own wait does not see
    the time the actor was paused with the call unread. Refused, not called, as a stale call.
    A header that is not a number of milliseconds is not taken (the call is served)."""
    if deadline is None or not _DEADLINE.fullmatch(deadline):
        return None
    late_s = time.time() - int(deadline) / 1000
    if late_s <= _CLOCK_TOLERANCE_S:
        return None
    return ProviderUnavailable(
        f"{provider}: the call was read {late_s:.1f} s after its router stopped waiting for it "
        "(by this actor's clock: the actor was paused, or the clocks disagree); not called",
        provider=provider,
        error_type="expired_in_queue",
    )


def _maybe_billed(error: ProviderError) -> bool:
    """A timeout after the request was sent (not one connecting to the provider)."""
    return error.error_class == "timeout" and error.error_type != "connect_timeout"


def _has_tokens(usage: Usage) -> bool:
    return bool(usage.input_tokens or usage.output_tokens)


def _traces(events: list[Event]) -> dict[str, dict[str, str]] | None:
    """The trace context ``events`` are held with: the current one (the call's), if traced."""
    if not tracing.enabled():
        return None
    headers = tracing.inject()
    return {event.id: headers for event in events} if headers else None


def _key(trace: dict[str, str] | None) -> str:
    return "" if not trace else trace.get("traceparent", "")
