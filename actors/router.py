"""The router actor: ``vapora.complete`` and ``vapora.stream`` (queue group ``router``).

For each task it decides (:func:`vapora.routing.decide`), appends ``route_decided``, and walks the
chain of providers, one attempt at a time:

1. a paid attempt first holds its upper-bound cost: against the router's budget lease, locally,
   when the lease covers it (see *Leases* below), else by reserving it with the budget keeper
   (``vapora.budget.reserve``); a refusal skips to the next candidate (attempt ``skipped``), and
   so does a keeper that does not answer in ``keeper_timeout_s``, whose reservation is then
   released (``not_called``) in case the keeper admits it late;
2. it calls ``vapora.provider.<name>.call`` with per-attempt timeouts (below);
3. a transient error, a rate limit, a timeout, a quota or configuration error appends
   ``fallback_triggered`` and moves on (releasing the reservation, reason ``failed``); a caller
   error (the provider's 400) is answered 502 ``provider_error`` without fallback; settlement of a
   success is the provider actor's ``spend_recorded``;
4. when nothing is left: 503 ``no_provider_available`` naming every attempt.

What a decision needs is kept in memory, not asked per request: each provider's availability is a
projection of ``provider_health_changed`` (last event per provider at start, then the tail), the
budget tier of ``budget_tier_changed`` (the keeper's status at start, then the tail, and every
reservation reply), and per-task spend of ``spend_recorded`` (from start-up on, for the task cap).
The router's own events are appended in the background while the provider works and are joined
before the reply, so an answer is never sent for a task whose events are not stored.

**Leases** (``[budget] lease_cents``, default on when there is a daily or monthly limit): the
router asks the keeper (``vapora.budget.lease``) for a lease of budget and admits paid attempts
against it without a round trip: ``committed`` (actual costs of finished attempts plus the upper
bounds of those in flight) never exceeds what was granted, and spend against the lease (the
provider's ``spend_recorded`` carries the lease id as its ``reservation_id``) draws it down in the
keeper's fold. It renews the lease in the background when less than half of the last grant is
left or half its life has passed, stops admitting against it ``margin`` before it expires (so
every attempt ends before the keeper reclaims it), and returns what it does not need when it
stops, when the lease runs out of time, or when the tier becomes Exceeded (and again, keeping only
what they cost, when the attempts in flight at that return have ended). With no lease, or one
too small for the attempt, it reserves per attempt as before; near a limit the keeper grants no
leases, so admission is exact there. Before its first lease it reads the task caps the keeper
enforces (``vapora.budget.caps``): a task's request naming no cap goes to the keeper when any
request of the task named one, however long ago (the router's start reads only the last hour
of the log). An attempt whose provider actor never replied keeps its
upper bound committed (it may have been billed).

**Timeouts per attempt** (milliseconds, sent in :class:`ProviderCall` and enforced by the provider
actor; the router waits that long plus ``grace_s`` for the reply):

* ``complete``: ``min(provider.timeout_ms, request.latency_required_ms)``;
* ``stream``: total ``provider.timeout_ms``; first token
  ``min(provider.timeout_ms, request.latency_required_ms or first_token_timeout_ms)``.

A provider actor that does not reply at all (killed mid-call) costs one wait; a ``complete``
attempt is then retried once on the same provider (its queue group hands it to a surviving
instance) before falling back. A stream is never retried after such a silence: chunks may have
gone out, so it ends with ``error``. Streams fall back only before their first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from nats import errors as nats_errors
from nats.errors import NoRespondersError
from nats.js.errors import NotFoundError
from opentelemetry import trace

from actors import tracing
from actors.connection import ConnectionFailed, header
from actors.eventlog import LogEntry
from actors.follow import LogFollower
from actors.provider import (
    COST_HEADER,
    DEADLINE_HEADER,
    ERROR_CLASS_HEADER,
    ERROR_TYPE_HEADER,
    RETRY_AFTER_HEADER,
    ROUTE_REASON_HEADER,
    SPEND_ID_HEADER,
    USAGE_HEADER,
    say_pending,
)
from actors.runner import Runtime
from actors.service import (
    OUTCOME_HEADER,
    ActorService,
    Endpoint,
    RequestContext,
    error_headers,
    error_payload,
)
from events import subjects
from events.codec import MAX_MESSAGE_BYTES, DecodeError, decode, decode_event, encode
from events.contract import (
    Attempt,
    AttemptsUnbilled,
    BudgetCaps,
    BudgetCapsRequest,
    BudgetLeaseReply,
    BudgetLeaseRequest,
    BudgetLeaseReturn,
    BudgetRelease,
    BudgetReserve,
    BudgetReserveReply,
    BudgetStatus,
    CompletionRequest,
    CompletionResult,
    ErrorReply,
    Outcome,
    Price,
    ProviderCall,
    ProviderCallResult,
    RouteDecision,
    StreamCancel,
    StreamEnd,
    Tier,
    Usage,
)
from events.log import (
    INSTANCE_FORGOTTEN_S,
    INSTANCE_STOPPED,
    BudgetReleased,
    BudgetReserved,
    BudgetTierChanged,
    Event,
    FallbackTriggered,
    ProviderHealthChanged,
    RouteDecided,
    SpendRecorded,
)
from vapora import telemetry
from vapora.budget import as_utc
from vapora.config import Config, ProviderConfig
from vapora.errors import (
    BudgetExceeded,
    InvalidRequest,
    NoProviderAvailable,
    ProviderRejected,
    ProviderStreamBroken,
    RequestTimeout,
    VaporaError,
    request_error,
)
from vapora.pricing import price_at, served_bound, served_tier, unsaid_tiers, upper_bound_cost
from vapora.providers import ProviderRequest, input_token_bound, output_ceiling
from vapora.providers.stream import CALLER_CANCELLED
from vapora.routing import (
    ProviderView,
    RouteOverBudget,
    RouteUnavailable,
    combined_view,
    decide,
    remaining_usd,
    task_cap_usd,
)
from vapora.telemetry import TASK_ID
from vapora.telemetry.messaging import current_failed
from vapora.telemetry.semconv import VAPORA

__all__ = ["RouterActor", "attempt_timeouts", "route_reason_class"]

#: The largest request the router takes: the provider call it becomes (the same prompt, plus
#: the attempt's fields) must fit the provider actor's limit, or every attempt fails after the
#: budget was reserved for it.
REQUEST_MAX_BYTES = MAX_MESSAGE_BYTES - 16 * 1024

log = logging.getLogger("vapora.router")

_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
_SERVICE_ERROR = "Nats-Service-Error"
_TASK_SPEND_ENTRIES = 100_000
#: Recent events' tasks kept for the tier changes they may cause (the keeper appends the change
#: right after it reads the event).
_EVENT_TASKS = 4096
#: How far back a starting router reads the tasks' spend (for their per-task caps).
TASK_SPEND_WINDOW = timedelta(hours=1)
LEASE_TTL_S = 300.0
_LEASE_TTL_MAX_S = 3600.0  # the contract's bound on BudgetLeaseRequest.ttl_s
# Skips that mean the budget did not allow the attempt (every candidate so: 402); a keeper that
# could not answer is not one (503).
_BUDGET_CODES = frozenset({"budget_refused", "task_budget"})
_KEEPER_AWAY = "budget_unavailable"
_RESERVATION_TTL_S = 120.0  # the contract's default for BudgetReserve.ttl_s
_RESERVATION_TTL_MAX_S = 3600.0  # and its bound
_DRAIN_MARGIN_S = 10.0  # a stop's margin past an attempt's timeout and grace (the spend append)
_APPEND_MARGIN_S = 60.0  # the provider's spend append (its 30 s acknowledgement timeout) and more
_LEASE_RETRY_S = 1.0  # after a refused or failed lease request, reserve per attempt this long
_CAPS_RESTARTS = 3  # reads of the keeper's caps begun again when the keeper restarted midway
_CAPS_RETRY_MAX_S = 60.0  # the longest wait before asking for the caps again
#: A silent attempt's hold (its provider actor never answered: stopped, paused, cut off) is said
#: to be pending (``vapora.budget.pending``) this often until its spend is recorded, for at most
#: :data:`SILENT_HOLD_S`: the keeper expires none of them meanwhile (its word stands 60 s; a
#: keeper that starts expires nothing for 15 s, so a word comes well within that).
_SILENT_WORD_S = 5.0
SILENT_HOLD_S = 3600.0
_SILENT_HOLDS_KEPT = 10_000


# --- pure helpers ---------------------------------------------------------------------------------


_A_DAY = timedelta(days=1)


def attempt_timeouts(
    provider: ProviderConfig,
    request: CompletionRequest,
    *,
    stream: bool,
    first_token_timeout_ms: int,
) -> tuple[int, int | None]:
    """``(total_ms, first_token_ms)`` of one attempt (see the module doc)."""
    if not stream:
        total = provider.timeout_ms
        if request.latency_required_ms is not None:
            total = min(total, request.latency_required_ms)
        return total, None
    wanted = request.latency_required_ms or first_token_timeout_ms
    return provider.timeout_ms, min(provider.timeout_ms, wanted)


def _new_id() -> str:
    # 128 random bits as 32 hex digits, like ``uuid4().hex`` without building a UUID (a fifth
    # of its cost; ids are opaque, unique by their randomness).
    return os.urandom(16).hex()


def _usd(amount: Decimal) -> str:
    return f"${amount:.6f}"


# --- one task -------------------------------------------------------------------------------------


class _Appends:
    """A task's events appended in the background (pipelined with the provider call); joined
    before the reply."""

    def __init__(self, router: RouterActor) -> None:
        self._router = router
        self._pending: list[asyncio.Task[None]] = []

    def add(self, *events: Event) -> None:
        self._pending.append(self._router._spawn(self._router._append, list(events)))

    async def join(self, within_s: float) -> None:
        # Usually every append was acknowledged while the provider worked: nothing to wait for.
        # Waiting never cancels an append (a cancelled handler leaves its events to finish).
        pending = [append for append in self._pending if not append.done()]
        if pending:
            await asyncio.wait(pending, timeout=within_s)


@dataclass
class _Failure:
    """Why one attempt produced no answer."""

    error_class: str
    message: str
    fallback: bool
    usage: Usage = field(default_factory=Usage)
    cost: Decimal = Decimal(0)
    no_reply: bool = False
    #: Answered, but the provider may still bill it (it had the request when its time ran
    #: out): its hold stays, as for a call that never answered; no retry on the same provider.
    billed_unknown: bool = False
    #: A stream's attempt that failed without saying whether its chunks reached the caller:
    #: the stream must not fall back (another provider's text would follow this one's).
    chunks_unknown: bool = False
    #: The provider error's type (``Vapora-Error-Type``), when it had one.
    error_type: str | None = None

    @property
    def holds(self) -> bool:
        """Whether the attempt's hold stays: what it cost is not known."""
        return self.no_reply or self.billed_unknown


@dataclass
class _Task:
    """The working state of one task's walk down its chain."""

    task_id: str
    request: CompletionRequest
    appends: _Appends
    stream_to: str | None
    costs: dict[str, Decimal]
    cap: Decimal | None
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    held: int = 0  # attempts whose holds stay: silent, or billed an unknown amount
    spend_id: str | None = None  # the id the latest attempt's spend takes (a held attempt's)
    shared: bool = False  # capped, and its task id may name other requests on other routers
    reasons: list[str] = field(default_factory=list)  # why each attempt failed ("" if it did not)
    spent: Decimal = Decimal(0)
    number: int = 0
    route_reason: str = ""  # why the current attempt's provider (for its span)

    def next_number(self) -> int:
        self.number += 1
        return self.number


@dataclass
class _Lease:
    """The router's local view of one budget lease."""

    lease_id: str
    granted: Decimal = Decimal(0)  # the keeper's cumulative grant
    committed: Decimal = Decimal(0)  # actual costs of finished attempts + upper bounds in flight
    granted_at: datetime | None = None
    usable_until: datetime | None = None  # admit nothing against it from then on
    last_grant: Decimal = Decimal(0)
    in_flight: int = 0  # attempts admitted against it and not yet settled
    returned_with: Decimal | None = None  # what the last return kept, once returned

    def take(self, amount: Decimal, now: datetime) -> bool:
        """Commit ``amount`` if the lease is usable and covers it."""
        if (
            self.usable_until is None
            or now >= self.usable_until
            or self.committed + amount > self.granted
        ):
            return False
        self.committed += amount
        self.in_flight += 1
        return True

    def running_low(self, now: datetime) -> bool:
        if self.usable_until is None or self.granted_at is None:
            return True
        half_life = self.granted_at + (self.usable_until - self.granted_at) / 2
        return now >= half_life or self.granted - self.committed < self.last_grant / 2


class _Broken(Exception):
    """A stream failed after its first chunk: end it with ``error`` (no fallback)."""

    def __init__(self, failure: _Failure, provider: str) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.provider = provider


# --- the actor ------------------------------------------------------------------------------------


class RouterActor:
    """Routes tasks on ``vapora.complete`` / ``vapora.stream`` (see the module doc).

    ``reserve``: reserve with the budget keeper before paid attempts; default: when the config
    has a daily or monthly limit. ``grace_s``: how much longer than an attempt's own timeout the
    router waits for a provider actor's reply. ``first_token_timeout_ms``: a stream's default
    time-to-first-token limit.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        provider: str | None = None,
        reserve: bool | None = None,
        grace_s: float = 1.0,
        first_token_timeout_ms: int = 10_000,
        keeper_timeout_s: float = 2.0,
        max_concurrency: int = 1024,
        lease: bool | None = None,
    ) -> None:
        del provider  # the shape every actor shares; a router serves every provider
        self.runtime = runtime
        self.config: Config = runtime.config
        self.name = "router"
        budget = runtime.config.budget
        self.reserve = (
            reserve
            if reserve is not None
            else (budget.daily_limit_usd is not None or budget.monthly_limit_usd is not None)
        )
        self.grace_s = grace_s
        self.leasing = self.reserve and budget.lease_usd > 0 if lease is None else lease
        self.holder = f"router-{_new_id()[:12]}"
        self.lease: _Lease | None = None
        self._asking = False
        self._lease_retry_at: datetime | None = None
        self._caps_read = False  # the keeper's task caps (read before the first lease)
        self._caps_failures = 0
        self._caps_denied = False  # (said once in the log)
        # Nothing is admitted against a lease this close to its expiry: every attempt (its
        # timeout plus the grace, plus the provider's spend append) ends before the keeper
        # reclaims the lease.
        longest_s = max((p.timeout_ms for p in runtime.config.providers), default=30_000) / 1000
        self.lease_margin = timedelta(seconds=longest_s + grace_s + 30)
        self.lease_ttl_s = max(LEASE_TTL_S, 2 * self.lease_margin.total_seconds())
        if self.lease_ttl_s > _LEASE_TTL_MAX_S:  # attempts may outlive any lease: reserve each
            self.leasing = False
        self._price_minute: datetime | None = None
        self._prices: dict[str, Price] = {}
        # The service tiers other than the standard one each provider said it served calls at
        # (an OpenAI project whose default tier is priority): its attempts are bounded at the
        # dearest of their rates and the standard ones from then on.
        self._served_tiers: dict[str, set[str]] = {}
        self.first_token_timeout_ms = first_token_timeout_ms
        self.keeper_timeout_s = keeper_timeout_s
        # Until a provider actor says otherwise, a provider is taken as usable: whether its API
        # key is set is the provider actors' to say (their health events), not this router's
        # own environment, which in a split deployment holds no keys at all.
        self.views: dict[str, ProviderView] = {
            p.name: ProviderView() for p in runtime.config.providers
        }
        # Per provider, each provider actor instance's last word and when this router heard it
        # (monotonic seconds; the most recently heard last).
        self._instances: dict[str, OrderedDict[str, tuple[ProviderHealthChanged, float]]] = {}
        self._clock: Callable[[], float] = time.monotonic
        # Looked up per attempt: by name, and whether it is paid, once (the config is immutable).
        self._providers = {p.name: p for p in runtime.config.providers}
        self._paid = {p.name for p in runtime.config.providers if not p.zero_cost}
        self.tier = Tier.NORMAL
        self.task_spend: OrderedDict[str, Decimal] = OrderedDict()
        #: The lowest cap the keeper admitted a reservation of each task under
        #: (``budget_reserved.task_limit_usd``: what the keeper remembers of it), with when the
        #: task was last heard of: a later request of the task naming no cap is held to it too
        #: (it was admitted on a lease, unchecked: $0.58 spent against a remembered $0.15 in a
        #: review). Forgotten, as the keeper forgets, after ``task_retention_hours`` without a
        #: word of the task; a router that starts reads the last :data:`TASK_SPEND_WINDOW`.
        self.task_caps: OrderedDict[str, tuple[Decimal, datetime]] = OrderedDict()
        # The task of each recent event that names one (a spend, a reservation), by event id:
        # a tier change's log line names the task whose event moved the tier (its causation),
        # and a silent attempt whose spend was read before it ended is not waited for.
        self._event_tasks: OrderedDict[str, str] = OrderedDict()
        # Silent attempts (no answer from their provider actor), by the id their spend takes
        # (``Vapora-Spend-Id``): their hold (a reservation or a lease) and until when (this
        # router's clock) it is said to be pending. A provider actor paused past the hold's
        # life records the call's spend when it resumes, after the keeper let the room go.
        self._silent_holds: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.silent_word_s = _SILENT_WORD_S
        self._silent_cap_said = False
        # Capped tasks' money this router has committed and not yet seen recorded in the log:
        # upper bounds of attempts in flight (and of silent ones, which may have been billed),
        # actual costs of answered attempts until their spend_recorded reaches the tail. With
        # the recorded spend, what a task's next attempt is checked against, so that
        # concurrent requests of one task keep to its cap on a lease too.
        self.task_pending: OrderedDict[str, Decimal] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None  # set while running
        self._background: set[asyncio.Task[None]] = set()
        self._stop = anyio.Event()
        self.service = ActorService(
            runtime.nc,
            name=self.name,
            reserved_replies=(runtime.log.settings.prefix + ".",),
            endpoints=[
                Endpoint(
                    name="complete",
                    subject=subjects.COMPLETE,
                    request_type=CompletionRequest,
                    decode_error=_request_error,
                    handler=self._on_complete,
                    queue_group="router",
                    needs_reply=True,
                    max_bytes=REQUEST_MAX_BYTES,
                    # No limit of its own (the service's default was 120 s): each attempt has
                    # its provider's time limit, so a chain ends on its own; a cap below the
                    # chain's answered 504 while the provider call it cut short still billed.
                    timeout=None,
                ),
                Endpoint(
                    name="stream",
                    subject=subjects.STREAM,
                    request_type=CompletionRequest,
                    decode_error=_request_error,
                    handler=self._on_stream,
                    queue_group="router",
                    needs_reply=True,
                    stream=True,
                    max_bytes=REQUEST_MAX_BYTES,
                    timeout=None,
                ),
            ],
            description="routes completions across providers with fallback",
            max_concurrency=max_concurrency,
            # A stop lets the tasks in flight finish their attempt (its timeout, the grace, the
            # append): cut, a task's caller gets a 503 saying so (its spend is in the log).
            drain_timeout=longest_s + grace_s + _DRAIN_MARGIN_S,
        )

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Load the projections, follow the log, serve until :meth:`stop`, then drain."""
        last = await self._last_sequence()
        await self._load_health()
        await self._load_tier()
        await self._load_task_spend(last)
        prefix = self.runtime.log.settings.prefix
        async with anyio.create_task_group() as tg:
            self._loop = asyncio.get_running_loop()
            try:
                for view in ("health.>", "budget", "spend.>"):
                    await tg.start(self._follower(f"{prefix}.{view}", last).run)
                tg.start_soon(self._say_silent_holds)
                # Provider actors say which attempts ended unbilled (AttemptsUnbilled).
                unbilled = await self.runtime.nc.subscribe(
                    subjects.BUDGET_UNBILLED, cb=self._on_unbilled
                )
                if self.leasing:  # a lease before the first paid request, if the keeper grants one
                    self._ask_in_background(Decimal(0), self.runtime.clock())
                async with anyio.create_task_group() as serving:
                    await serving.start(self.service.run)
                    task_status.started()
                    await self._stop.wait()
                    self.service.stop()
                if self.lease is not None:  # every attempt has ended: give back what is left
                    with anyio.move_on_after(self.keeper_timeout_s):
                        await self._return_lease(self.lease, "returned")
                with contextlib.suppress(Exception):  # (a closed connection: gone already)
                    await unbilled.unsubscribe()
            finally:
                await self._cancel_background()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stop_timeout_s(self) -> float:
        """How long a stop may take: the drain, then giving the lease back."""
        return self.service.drain_timeout + self.keeper_timeout_s + _DRAIN_MARGIN_S

    def _spawn(self, func: Callable[..., Any], *args: Any) -> asyncio.Task[None]:
        """Run ``func(*args)`` in the background, as a plain asyncio task the router tracks and
        cancels when it stops (a task group's ``start_soon`` cost several times as much; two or
        three of these run per completion). A failure is logged, never lost."""
        assert self._loop is not None, "the router is not running"
        task = self._loop.create_task(func(*args))
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("router: background task failed", exc_info=task.exception())

    async def _cancel_background(self) -> None:
        """Stop starting background work; cancel what still runs (as the task group that ran
        it did) and wait for it."""
        self._loop = None
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _append(self, events: list[Event]) -> None:
        try:
            await self.runtime.log.append_many(events)
        except Exception:
            log.exception("router: could not append %d events", len(events))

    # --- projections --------------------------------------------------------------------------

    async def _last_sequence(self) -> int:
        try:
            return await self.runtime.log.last_sequence()
        except NotFoundError:
            await self.runtime.log.ensure_stream()
            return await self.runtime.log.last_sequence()

    async def _load_health(self) -> None:
        """Each provider's last health event, then every one of the last
        :data:`INSTANCE_FORGOTTEN_S` (each live instance repeats its own within it): the last
        event alone may be one instance's, where another serves the provider."""
        eventlog = self.runtime.log
        for provider in self.config.providers:
            subject = f"{eventlog.settings.prefix}.health.{provider.name}"
            try:
                message = await eventlog.js.get_last_msg(eventlog.settings.name, subject)
            except NotFoundError:
                continue
            if message.data:
                self._apply(decode_event(message.data))
        since = datetime.now(UTC) - timedelta(seconds=INSTANCE_FORGOTTEN_S)
        subject = f"{eventlog.settings.prefix}.health.>"
        replay = eventlog.replay_since(since, filter_subject=subject)
        try:
            async with contextlib.aclosing(replay):
                async for batch in replay:
                    for entry in batch:
                        self._apply(entry.event)
        except Exception as exc:
            log.warning("router: the recent health events could not be read (%s)", exc)

    async def _load_task_spend(self, last: int) -> None:
        """What tasks spent in the last :data:`TASK_SPEND_WINDOW` of the log, up to ``last``
        (the follower goes on from there): a router that starts (again) would otherwise let a
        capped task spend its whole cap again. Older tasks are not looked at (a restart reads
        an hour of spend, not the whole log); without the log the router starts anyway."""
        since = datetime.now(UTC) - TASK_SPEND_WINDOW  # the server's storing time
        prefix = self.runtime.log.settings.prefix
        # The budget's first (the caps tasks asked for), so that a spend read after a task's
        # reservation keeps its cap on from the spend's time.
        for view in ("budget", "spend.>"):
            replay = self.runtime.log.replay_since(since, filter_subject=f"{prefix}.{view}")
            # (of the budget's, the reservations alone: an hour-old tier change would undo the
            # tier the keeper said it enforces now)
            only = BudgetReserved if view == "budget" else None
            try:
                async with contextlib.aclosing(replay):  # its consumer deleted at once on return
                    await self._apply_until(replay, last, only)
            except Exception as exc:
                log.warning("router: the recent %s of tasks could not be read (%s)", view, exc)

    async def _apply_until(self, replay: Any, last: int, only: type | None = None) -> None:
        async for batch in replay:
            for entry in batch:
                if entry.seq > last:
                    return  # (the followers go on from there)
                if only is None or isinstance(entry.event, only):
                    self._apply(entry.event)

    async def _load_tier(self) -> None:
        try:
            reply = await self.runtime.nc.request(subjects.BUDGET, b"{}", timeout=1.0)
            if not header(reply, _SERVICE_ERROR_CODE):
                self._set_tier(decode(reply.data, BudgetStatus).tier, announce=True)
        except Exception as exc:  # no keeper yet: Normal until the first tier event
            log.info("router: budget status unavailable at start (%s); tier Normal", exc)

    def _follower(self, filter_subject: str, last: int) -> LogFollower:
        """Follows the log's events on ``filter_subject`` after sequence ``last`` into this
        router's views, through lost consumers and server restarts (:mod:`actors.follow`)."""
        position = last

        async def apply(batch: list[LogEntry[Event]]) -> None:
            nonlocal position
            for entry in batch:
                self._apply(entry.event, live=True, stored=(entry.subject, entry.raw_headers))
                position = entry.seq

        return LogFollower(
            self.runtime.log,
            name=f"router {filter_subject}",
            apply=apply,
            position=lambda: position,
            filter_subject=filter_subject,
        )

    def _set_tier(self, tier: Tier, *, announce: bool = False) -> None:
        changed, self.tier = tier is not self.tier, tier
        if (changed or announce) and telemetry.STATE.metrics is not None:
            telemetry.STATE.metrics.record_tier(tier.value)
        if tier is Tier.EXCEEDED and self.lease is not None and self._loop is not None:
            lease, self.lease = self.lease, None  # nothing paid is admitted: give it back
            self._spawn(self._return_lease, lease, "revoked")

    def _apply(
        self, event: Event, *, live: bool = False, stored: tuple[str, bytes | None] = ("", None)
    ) -> None:
        match event:
            case ProviderHealthChanged():
                self.views[event.provider] = self._view(event)
            case BudgetTierChanged():
                self._set_tier(event.to_tier)
                if live:
                    _observe_enforcement(event.to_tier, "tier_changed")
                    # Its line in the trace the change was made in (the task that moved it).
                    cause = event.causation_id
                    token = TASK_ID.set(self._event_tasks.get(cause) if cause else None)
                    try:
                        with (
                            tracing.process_span(*stored, group="router")
                            if tracing.enabled()
                            else contextlib.nullcontext()
                        ):
                            log.info(
                                "budget tier %s -> %s", event.from_tier.value, event.to_tier.value
                            )
                    finally:
                        TASK_ID.reset(token)
            case BudgetReserved(task_limit_usd=limit) if limit is not None:
                self._lower_cap(event.task_id, limit, event.at)
            case BudgetReleased():
                holds = self._silent_holds
                for key in [k for k, (hold, _) in holds.items() if hold == event.reservation_id]:
                    del holds[key]
            case SpendRecorded():
                self._note_tier(event)  # (the last hour's, read at the start, too)
                if event.reservation_id is not None:
                    self._silent_holds.pop(event.id, None)
                if event.task_id in self.task_caps:  # heard of: its cap kept on
                    self._lower_cap(event.task_id, None, event.at)
                spend = self.task_spend
                spend[event.task_id] = spend.pop(event.task_id, Decimal(0)) + event.cost_usd
                if len(spend) > _TASK_SPEND_ENTRIES:
                    spend.popitem(last=False)
                pending = self.task_pending.get(event.task_id)
                if pending is not None:  # now counted as recorded: no longer as pending
                    self._add_pending(event.task_id, -min(pending, event.cost_usd))
            case _:
                pass
        task_id = getattr(event, "task_id", None)
        if task_id is not None and live:
            tasks = self._event_tasks
            tasks[event.id] = task_id
            if len(tasks) > _EVENT_TASKS:
                tasks.popitem(last=False)

    def _view(self, event: ProviderHealthChanged) -> ProviderView:
        """The provider's view from what each of its instances said last
        (:func:`vapora.routing.combined_view`). An instance that stopped, or that this router
        has not heard from in :data:`INSTANCE_FORGOTTEN_S`, no longer counts (events from
        before instances were named count as one)."""
        instances = self._instances.setdefault(event.provider, OrderedDict())
        name = event.instance or ""
        instances.pop(name, None)
        heard = self._clock()
        if event.reason != INSTANCE_STOPPED:
            instances[name] = (event, heard)  # the most recently heard last
        while len(instances) > _INSTANCES_REMEMBERED:
            instances.popitem(last=False)
        # Aged by when this router heard each one (the instances' clocks may disagree): each
        # live instance repeats itself every HEALTH_HEARTBEAT_S.
        live = [e for e, at in instances.values() if heard - at <= INSTANCE_FORGOTTEN_S]
        provider = self._providers.get(event.provider)
        return combined_view(live, provider.api_key_env if provider is not None else None)

    # --- handlers -----------------------------------------------------------------------------

    async def _on_complete(
        self, request: CompletionRequest, ctx: RequestContext
    ) -> CompletionResult:
        task = self._task(request, stream_to=None, ctx=ctx)
        try:
            decision = self._decide(task)
            result = await self._walk(task, decision)
        except VaporaError as error:
            error.of_task(task.task_id)  # its answer names the task
            raise
        finally:
            await task.appends.join(self.runtime.log.ack_timeout)
        return CompletionResult(
            task_id=task.task_id,
            provider=result.provider,
            model=result.model,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=result.usage,
            cost_usd=result.cost_usd,
            latency_ms=(time.perf_counter() - task.started) * 1000,
            attempts=task.attempts,
            route=decision,
            usage_estimated=result.usage_estimated,
        )

    async def _on_stream(self, request: CompletionRequest, ctx: RequestContext) -> None:
        task = self._task(request, stream_to=ctx.reply, ctx=ctx)
        try:
            decision = self._decide(task)
            result = await self._walk(task, decision)
        except _Broken as broken:
            await task.appends.join(self.runtime.log.ack_timeout)
            failure = broken.failure
            error: VaporaError = (
                RequestTimeout(failure.message)
                if failure.no_reply
                else ProviderStreamBroken(failure.message, provider=broken.provider)
            )
            await self._stream_error(ctx, task, error, failure)
            return None
        except VaporaError as error:
            await task.appends.join(self.runtime.log.ack_timeout)
            await self._stream_error(ctx, task, error, None)
            return None
        await task.appends.join(self.runtime.log.ack_timeout)
        end = StreamEnd(
            task_id=task.task_id,
            provider=result.provider,
            model=result.model,
            finish_reason=result.finish_reason,
            usage=result.usage,
            cost_usd=result.cost_usd,
            latency_ms=(time.perf_counter() - task.started) * 1000,
            attempts=task.attempts,
            route=decision,
            chunks=result.chunks,
            usage_estimated=result.usage_estimated,
        )
        await ctx.publish(ctx.reply, end)
        return None

    async def _stream_error(
        self, ctx: RequestContext, task: _Task, error: VaporaError, failure: _Failure | None
    ) -> None:
        known = failure is not None and not failure.holds  # else what it cost is unknown
        if known and failure is not None:
            error.of_task(task.task_id, failure.usage, failure.cost)
        else:
            error.of_task(task.task_id)
        message = error_payload(error, stream=True)
        # A stream its caller stopped reading (vapora.stream.cancel) is answered (it may still
        # listen), but nothing failed: its span was ERROR "provider_error", as a broken one's.
        cancelled = failure is not None and failure.error_type == CALLER_CANCELLED
        headers = error_headers(error, failed=not cancelled)
        await self.runtime.nc.publish(ctx.reply, message, headers=headers)

    # --- deciding -----------------------------------------------------------------------------

    def _task(
        self, request: CompletionRequest, *, stream_to: str | None, ctx: RequestContext
    ) -> _Task:
        task_id = request.task_id or _new_id()
        # A task named by the caller, for more than this request: its other requests may run on
        # other routers at the same time (see _attempt_provider).
        scope = ctx.header(subjects.TASK_SCOPE_HEADER)
        if scope is not None and scope != "request":
            # Taken as "shared" it would be safe, but the caller meant something by it.
            shown = scope if len(scope) <= 40 else scope[:40] + "..."
            raise InvalidRequest(
                f"header {subjects.TASK_SCOPE_HEADER}: {shown!r} is not a task scope; the only "
                "one is 'request' (its task_id names this request alone): send that or none"
            )
        cap = task_cap_usd(self.config, request)
        named = request.task_id is not None and scope != "request"
        remembered = self._cap_of(task_id) if named else None
        if remembered is not None:  # the lowest cap a request of the task asked for
            cap = remembered if cap is None else min(cap, remembered)
        shared = cap is not None and named
        TASK_ID.set(task_id)
        if tracing.enabled():
            span = trace.get_current_span()
            span.set_attribute(VAPORA.task_id, task_id)
            span.set_attribute(VAPORA.task_type, request.task_type.value)
        estimate = ProviderRequest(
            prompt=request.prompt,
            messages=request.messages,
            system=request.system,
            max_tokens=request.max_tokens,
        )
        input_tokens = input_token_bound(estimate)
        prices = self._prices_now()
        costs = {
            p.name: upper_bound_cost(
                input_tokens, output_ceiling(p.model, estimate.output_limit), prices[p.name]
            )
            for p in self.config.providers
        }
        return _Task(
            task_id=task_id,
            request=request,
            appends=_Appends(self),
            stream_to=stream_to,
            costs=costs,
            cap=cap,
            shared=shared,
        )

    def _cap_of(self, task_id: str) -> Decimal | None:
        held = self.task_caps.get(task_id)
        if held is None:
            return None
        # The keeper forgets an idle task on the first event of a UTC day past its retention:
        # up to a day later than the retention. Kept that long (longer rather than shorter:
        # forgotten first here, a request naming no cap went on the lease unchecked).
        if as_utc(self.runtime.clock()) - held[1] > self.config.budget.task_retention + _A_DAY:
            del self.task_caps[task_id]
            return None
        return held[0]

    def _lower_cap(self, task_id: str, limit: Decimal | None, at: datetime) -> None:
        """The task was heard of at ``at``, under ``limit`` (None: a spend of it)."""
        at = as_utc(at)  # (an event's time may have no zone: taken as UTC, as the keeper does)
        caps = self.task_caps
        known = caps.pop(task_id, None)
        if known is not None and limit is not None:
            limit = min(known[0], limit)
        elif known is not None:
            limit = known[0]
        if limit is None:
            return  # (a task with no cap known: nothing kept)
        caps[task_id] = (limit, max(at, known[1]) if known is not None else at)
        if len(caps) > _TASK_SPEND_ENTRIES:
            caps.popitem(last=False)

    def _decide(self, task: _Task) -> RouteDecision:
        spent = self.task_spend.get(task.task_id, Decimal(0))
        now = self.runtime.clock()
        try:
            decision = decide(
                task.request,
                self.config,
                now=now,
                views=self.views,
                estimated_costs=task.costs,
                tier=self.tier,
                task_remaining_usd=remaining_usd(task.cap, spent),
            )
        except (RouteOverBudget, RouteUnavailable) as refused:
            task.appends.add(self._decided(task, refused.decision, now))
            _observe_refusal(task.request, refused)
            raise
        task.appends.add(self._decided(task, decision, now))
        _observe_decision(task.request, decision)
        return decision

    def _decided(self, task: _Task, decision: RouteDecision, now: datetime) -> RouteDecided:
        return RouteDecided(
            id=_new_id(),
            at=now,  # the instant the decision was made for
            task_id=task.task_id,
            task_type=task.request.task_type,
            quality=task.request.quality,
            decision=decision,
            stream=task.stream_to is not None,
        )

    # --- walking the chain --------------------------------------------------------------------

    async def _walk(self, task: _Task, decision: RouteDecision) -> ProviderCallResult:
        # The route_decided append (a background task) publishes on the next loop turn, right
        # after the first request went out: the decision is not on the request's path, and it
        # reaches the log while the provider works (its acknowledgement is awaited before the
        # reply).
        chain = decision.chain
        task.route_reason = decision.reason
        too_long: set[str] = set()  # models that refused the input as longer than their window
        for index, name in enumerate(chain):
            provider = self._providers.get(name)
            assert provider is not None  # decide() keeps configured providers only
            if provider.model in too_long:
                outcome: ProviderCallResult | _Failure = self._skipped(
                    task,
                    provider,
                    _OVERFLOW,
                    f"model {provider.model} already refused this input as too long",
                )
            else:
                outcome = await self._try_provider(task, provider)
            if isinstance(outcome, ProviderCallResult):
                return outcome
            if outcome.error_class == "stream_broken" or (
                task.stream_to and (outcome.no_reply or outcome.chunks_unknown)
            ):
                if outcome.no_reply:
                    # The provider actor said nothing (it died, or its answer was lost): it may
                    # have recorded nothing either. The log keeps the attempt and why it ended
                    # the task (to no other provider: chunks may have reached the caller).
                    task.appends.add(self._fallback(task, name, None, outcome))
                    if task.stream_to is not None:
                        # An actor that was paused, not dead, stops streaming to a caller
                        # already told the stream failed (its chunks came after the error).
                        cancel = encode(StreamCancel(stream_to=task.stream_to))
                        self._spawn(self.runtime.nc.publish, subjects.STREAM_CANCEL, cancel)
                raise _Broken(outcome, name)  # chunks may have reached the caller: no fallback
            if outcome.error_class == _OVERFLOW and self.config.routing.context_overflow_fallback:
                too_long.add(provider.model)  # another model, with a larger window, may take it
            elif not outcome.fallback:
                rejected = ProviderRejected(outcome.message, provider=name)
                if not outcome.holds:  # what the attempt cost is known: said with the error
                    rejected.of_task(task.task_id, outcome.usage, outcome.cost)
                raise rejected
            following = chain[index + 1] if index + 1 < len(chain) else None
            task.appends.add(self._fallback(task, name, following, outcome))
            _observe_fallback(name, following, outcome)
            task.route_reason = f"fallback after {name}: {outcome.error_class}"
        raise self._exhausted(task)

    def _fallback(
        self, task: _Task, name: str, following: str | None, failure: _Failure
    ) -> FallbackTriggered:
        return FallbackTriggered(
            id=_new_id(),
            at=self.runtime.clock(),
            task_id=task.task_id,
            from_provider=name,
            to_provider=following,
            reason=f"{failure.error_class}: {failure.message}",
            attempt=task.number,
        )

    def _exhausted(self, task: _Task) -> NoProviderAvailable | BudgetExceeded | ProviderRejected:
        tried = "; ".join(
            f"{a.provider} {a.outcome.value}: {why}"
            for a, why in zip(task.attempts, task.reasons, strict=True)
        )
        if task.attempts and all(a.error_code in _BUDGET_CODES for a in task.attempts):
            return BudgetExceeded(f"task {task.task_id}: no candidate within the budget: {tried}")
        if task.attempts and all(a.error_code == _OVERFLOW for a in task.attempts):
            # Every model refused the input as too long: the caller's to shorten (502).
            return ProviderRejected(
                f"task {task.task_id}: the input is longer than every model's context window: "
                f"{tried}",
                provider=task.attempts[-1].provider,
            )
        return NoProviderAvailable(f"task {task.task_id}: every provider failed: {tried}")

    async def _try_provider(
        self, task: _Task, provider: ProviderConfig
    ) -> ProviderCallResult | _Failure:
        """One provider: reserve, call (again if its actor never replied), release on failure."""
        refusal = self._over_task_cap(task, provider)
        if refusal is not None:
            return self._skipped(task, provider, "task_budget", refusal)
        amount = task.costs[provider.name]
        if task.cap is None:
            return await self._attempt_provider(task, provider, amount)
        # A capped task: the attempt's upper bound is pending until it ends, then its actual
        # cost until the log's spend_recorded for it reaches this router (a silent attempt's
        # bound stays: it may have been billed).
        spent_before, held_before = task.spent, task.held
        self._add_pending(task.task_id, amount)
        finished = False
        try:
            outcome = await self._attempt_provider(task, provider, amount)
            finished = True
            return outcome
        finally:
            # Answered calls: their actual cost (in task.spent) instead of their bound. The
            # bound stays for a silent call, and for one cut short: either may have been billed.
            unanswered = task.held - held_before + (not finished)
            kept = amount * unanswered
            self._add_pending(task.task_id, task.spent - spent_before + kept - amount)

    def _spend_heard(self, spend_id: str | None) -> bool:
        """Whether the spend ``spend_id`` names (an attempt's) has reached this router's tail:
        its call was made and billed (an attempt ended unbilled is remembered with no task)."""
        return spend_id is not None and bool(self._event_tasks.get(spend_id))

    def _keep_silent_hold(self, hold_id: str, task: _Task) -> None:
        """Say that the hold ``hold_id`` (a reservation, or a lease the attempt was admitted
        against) is pending, at once and then every :attr:`silent_word_s`, until the spend of
        ``task``'s latest attempt reaches this router's tail, or for :data:`SILENT_HOLD_S`: the
        call may have been billed, and its provider actor may record it much later (a process
        paused past the hold's life: the keeper released the hold as expired, admitted other
        work into that room, then the spend landed, 50 % past a day's limit in a review). A
        router that stops forgets them: the keeper may then expire them as before."""
        key = task.spend_id
        if key is None or key in self._event_tasks:
            return  # its spend is in the log already (read before the attempt ended)
        holds = self._silent_holds
        holds[key] = (hold_id, self._clock() + SILENT_HOLD_S)
        while len(holds) > _SILENT_HOLDS_KEPT:
            holds.popitem(last=False)
            if not self._silent_cap_said:
                self._silent_cap_said = True
                log.warning(
                    "router: more than %d attempts got no answer from their provider actor; "
                    "the oldest of their holds are no longer said to be pending",
                    _SILENT_HOLDS_KEPT,
                )
        if self._loop is not None:
            self._spawn(say_pending, self.runtime.nc, [hold_id])

    async def _on_unbilled(self, message: Any) -> None:
        """``vapora.budget.unbilled``: attempts whose provider actor ended them with nothing
        billed, or did not make them. A silent one's hold is no longer said to be pending (its
        spend will not come); one not silent yet is remembered, so that it is not kept later."""
        try:
            unbilled = decode(message.data, AttemptsUnbilled)
        except DecodeError as exc:
            log.warning("router: an unbilled notice that is not one: %s", exc)
            return
        holds, tasks = self._silent_holds, self._event_tasks
        for spend_id in unbilled.spend_ids:
            holds.pop(spend_id, None)
            tasks[spend_id] = tasks.get(spend_id, "")
        while len(tasks) > _EVENT_TASKS:
            tasks.popitem(last=False)

    async def _say_silent_holds(self) -> None:
        """Every :attr:`silent_word_s`: the silent attempts' holds still pending (see
        :meth:`_keep_silent_hold`)."""
        while True:
            await anyio.sleep(self.silent_word_s)
            now, holds = self._clock(), self._silent_holds
            for key in [key for key, (_, until) in holds.items() if until <= now]:
                del holds[key]  # its provider never recorded it: the keeper may expire it
            if holds:
                await say_pending(
                    self.runtime.nc, list(dict.fromkeys(h for h, _ in holds.values()))
                )

    def _add_pending(self, task_id: str, delta: Decimal) -> None:
        pending = self.task_pending
        total = pending.pop(task_id, Decimal(0)) + delta
        if total > 0:
            pending[task_id] = total
            if len(pending) > _TASK_SPEND_ENTRIES:
                pending.popitem(last=False)

    async def _attempt_provider(
        self, task: _Task, provider: ProviderConfig, amount: Decimal
    ) -> ProviderCallResult | _Failure:
        reservation_id: str | None = None
        lease: _Lease | None = None
        # A capped task the caller named for more than this request may have requests on
        # several routers at once, and only the keeper sees them all (each router knows its own
        # attempts in flight only): its attempts are reserved with the keeper, never taken from
        # a lease. A task of this request alone (named by the router, or by a client with
        # ``Vapora-Task-Scope: request``) is covered by this router's own pending money.
        capped = task.shared  # (shared: a capped task its caller named)
        if (self.reserve or capped) and provider.name in self._paid:
            lease = None if capped else self._take_from_lease(amount)
            if lease is not None:
                reservation_id = lease.lease_id
            else:
                reservation_id, refusal, code = await self._reserve(task, provider)
                if refusal is not None and code == _KEEPER_AWAY and not self.reserve:
                    # No daily or monthly limit, and no keeper answering: the task's cap is
                    # this router's to check alone (as it was checked above), and to keep.
                    if task.cap is not None:
                        self._lower_cap(task.task_id, task.cap, self.runtime.clock())
                    log.warning(
                        "task %s: no budget keeper answered (%s); its cap is checked by this "
                        "router alone",
                        task.task_id,
                        refusal,
                    )
                    reservation_id = None
                elif refusal is not None:
                    return self._skipped(task, provider, code, refusal)
        outcome = await self._call(task, provider, reservation_id)
        # A silent attempt may still have been billed: its hold stays (on a lease its upper
        # bound stays committed; a reservation stays until its spend closes it or the keeper
        # expires it), and the retry needs a hold of its own.
        if isinstance(outcome, _Failure) and outcome.no_reply and task.stream_to is None:
            retry = True
            if reservation_id is not None:
                self._keep_silent_hold(reservation_id, task)  # a lease's id, or its own
            if self._spend_heard(task.spend_id):
                # The call was made and billed (its spend is in the log; it may have succeeded
                # or failed), its answer lost on the way back: sent to the same provider again,
                # it is billed twice (a nats-server killed and restarted a second later: 12 of
                # 36 calls billed twice, a review). Not sent again; the chain goes on as after
                # a failure (the actor's answer may have been one, to fall back on).
                retry = False
                outcome = _Failure(
                    outcome.error_class,
                    f"the {provider.name} call was made and billed (its spend {task.spend_id} "
                    "is in the log), but its answer was lost on the way back: not sent to it "
                    "again, so as not to bill it twice",
                    fallback=True,
                    no_reply=True,
                )
                task.reasons[-1] = f"{outcome.error_class}: {outcome.message}"  # (the 503's)
            elif self._over_task_cap(task, provider) is not None:
                # The silent attempt's bound is the task's pending money (it may have been
                # billed): a retry past the task's cap is not sent (taken from the lease, it
                # was never checked against the cap: two bounds under a cap of one and a half).
                retry = False
            elif lease is not None:
                retry = self._take_again(lease, amount)
                if not retry:
                    # The lease cannot hold the retry too (other attempts' bounds fill it): the
                    # silent attempt ends on it, its bound kept, and the retry is reserved
                    # with the keeper. (Not sent at all, the request failed 503 with a healthy
                    # instance serving: 6 of 8 calls in flight in a killed actor, a review.)
                    self._settle_on_lease(lease, amount, outcome)
                    lease = None
                    reservation_id, refusal, _ = await self._reserve(task, provider)
                    retry = refusal is None
                    if not retry:
                        reservation_id = None
            elif reservation_id is not None:
                reservation_id, refusal, _ = await self._reserve(task, provider)
                if refusal is not None:  # nothing held for a retry: the silent attempt stands
                    retry, reservation_id = False, None
            if retry:
                task.held += 1  # the silent attempt's
                # In the log, as a fallback to the same provider: its actor said nothing, and
                # may have recorded nothing of a call it made and the provider billed.
                task.appends.add(self._fallback(task, provider.name, provider.name, outcome))
                outcome = await self._call(task, provider, reservation_id)
        if isinstance(outcome, _Failure) and outcome.holds:
            task.held += 1
            if reservation_id is not None:
                self._keep_silent_hold(reservation_id, task)
        if lease is not None:
            self._settle_on_lease(lease, amount, outcome)
        elif isinstance(outcome, _Failure) and not outcome.holds and reservation_id is not None:
            # Answered with a failure (nothing to bill), or no actor to call (never made).
            if outcome.error_class == "no_responders":
                self._release(reservation_id, "not_called")
            else:
                # Given back before the next provider's reservation: in the background, that
                # one went first and the keeper still counted this hold against the task's cap
                # (or the day's limit), and a fallback that fitted was refused.
                await self._publish_release(
                    BudgetRelease(reservation_id=reservation_id, reason="failed")
                )
        return outcome

    def _over_task_cap(self, task: _Task, provider: ProviderConfig) -> str | None:
        if task.cap is None:
            return None
        pending = self.task_pending.get(task.task_id, Decimal(0))
        if task.spent == 0 and not pending:
            return None  # the decision checked its candidates against the task's remaining
        # This request's earlier attempts are in ``pending`` until the log records them.
        remaining = task.cap - self.task_spend.get(task.task_id, Decimal(0)) - pending
        if task.costs[provider.name] > remaining:
            estimate = _usd(task.costs[provider.name])
            return f"estimated {estimate} exceeds the task's remaining {_usd(remaining)}"
        return None

    def _skipped(self, task: _Task, provider: ProviderConfig, code: str, reason: str) -> _Failure:
        task.next_number()
        task.reasons.append(f"{code}: {reason}")
        task.attempts.append(
            Attempt(
                provider=provider.name,
                model=provider.model,
                outcome=Outcome.SKIPPED,
                error_code=code,
            )
        )
        return _Failure(error_class=code, message=reason, fallback=True)

    def _prices_now(self) -> dict[str, Price]:
        """Each provider's price in force now (DESIGN §4: a table price may change while the
        router runs), worked out once a minute; for a provider that said it serves at service
        tiers of their own rates (:meth:`_note_tier`), or that may serve at one before saying so
        (an OpenAI project's default tier: ``pricing.unsaid_tiers``), the dearest of those and
        the standard."""
        now = self.runtime.clock()
        minute = now.replace(second=0, microsecond=0)
        if minute != self._price_minute:
            self._price_minute = minute
            self._prices = {p.name: self._price_of(p, now) for p in self.config.providers}
        return self._prices

    def _price_of(self, provider: ProviderConfig, now: datetime) -> Price:
        kind = provider.kind.value
        price = price_at(kind, provider.model, provider.price, now)
        tiers = self._served_tiers.get(provider.name, set()) | unsaid_tiers(
            kind, provider.model, provider.service_tier
        )
        if not tiers:
            return price
        return served_bound(kind, provider.model, price, tiers, now)

    def _note_tier(self, spend: SpendRecorded) -> None:
        """The service tier ``spend``'s price names (``genai-prices service_tier=priority``):
        its provider serves calls at that tier, billed at its rates, so its attempts are bounded
        at them too from now on (the first such call could settle above its standard-rate
        hold). Kept while this router runs: a project that served one call at the standard
        tier may serve the next at priority. A router that starts learns them from the spend
        it reads at its start (the last :data:`TASK_SPEND_WINDOW`)."""
        tier = served_tier(spend.price)
        if tier is None or spend.provider not in self._providers:
            return
        tiers = self._served_tiers.setdefault(spend.provider, set())
        if tier not in tiers and len(tiers) < 8:
            tiers.add(tier)
            self._price_minute = None  # worked out again at the next attempt

    def _hold_s(self, provider: ProviderConfig) -> float:
        """How long a reservation is held: past the attempt's whole life (its timeout, the
        grace, the spend's append), so the keeper never expires it while the call may still
        bill; the contract's hour at most (``timeout_ms`` is bounded below it at load)."""
        life = provider.timeout_ms / 1000 + self.grace_s + _APPEND_MARGIN_S
        return min(_RESERVATION_TTL_MAX_S, max(_RESERVATION_TTL_S, life))

    async def _reserve(self, task: _Task, provider: ProviderConfig) -> tuple[str, str | None, str]:
        """Hold the attempt's upper-bound cost: ``(reservation_id, refusal reason or None, the
        skip's code)``: ``budget_refused`` when the keeper refused it (a 402 if every candidate
        ends so), ``budget_unavailable`` when no keeper could answer (a 503: nothing says the
        budget is spent)."""
        reservation_id = _new_id()
        ask = BudgetReserve(
            reservation_id=reservation_id,
            task_id=task.task_id,
            provider=provider.name,
            amount_usd=task.costs[provider.name],
            task_limit_usd=task.cap,
            ttl_s=self._hold_s(provider),
        )
        try:
            with tracing.request_span(subjects.BUDGET_RESERVE) as headers:
                message = await self.runtime.nc.request(
                    subjects.BUDGET_RESERVE,
                    encode(ask),
                    timeout=self.keeper_timeout_s,
                    headers=headers,
                )
        except NoRespondersError:
            return reservation_id, "the budget keeper is not running", _KEEPER_AWAY
        except TimeoutError:
            # A stalled keeper may still admit it when it comes back: give it back then (the
            # keeper takes this connection's requests in order, so the release follows it).
            self._release(reservation_id, "not_called")
            return reservation_id, "the budget keeper did not answer in time", _KEEPER_AWAY
        code = header(message, _SERVICE_ERROR_CODE)
        if code and header(message, OUTCOME_HEADER) == "unknown":
            # Cut by the keeper's stop, perhaps after admitting it: given back, as on a timeout.
            self._release(reservation_id, "not_called")
        if code:
            # A 400 is about the request itself (refused); anything else is the keeper's state.
            why = header(message, _SERVICE_ERROR) or "refused"
            return reservation_id, why, "budget_refused" if code == "400" else _KEEPER_AWAY
        reply = decode(message.data, BudgetReserveReply)
        self._set_tier(reply.tier)
        if not reply.admitted:
            _observe_enforcement(reply.tier, "reservation_refused")
            return reservation_id, reply.reason or "refused", "budget_refused"
        if task.cap is not None:  # the keeper holds the task to it now: so does this router
            self._lower_cap(task.task_id, task.cap, self.runtime.clock())
        return reservation_id, None, "budget_refused"

    # --- the budget lease ---------------------------------------------------------------------

    def _take_from_lease(self, amount: Decimal) -> _Lease | None:
        """Commit ``amount`` against the lease if it covers it (no round trip); ask for more in
        the background when it runs low. ``None``: reserve this attempt with the keeper."""
        if not self.leasing:
            return None
        now, lease = self.runtime.clock(), self.lease
        if lease is not None and lease.take(amount, now):
            if lease.running_low(now):
                self._ask_in_background(amount, now)
            return lease
        self._ask_in_background(amount, now)
        return None

    def _ask_in_background(self, amount: Decimal, now: datetime) -> None:
        backing_off = self._lease_retry_at is not None and now < self._lease_retry_at
        if not (self._asking or backing_off or self.tier is Tier.EXCEEDED):
            self._asking = True
            self._spawn(self._renew_lease, amount)

    def _take_again(self, lease: _Lease, amount: Decimal) -> bool:
        """Commit a retry of a silent attempt; the silent one is over, its bound stays."""
        if lease is self.lease and lease.take(amount, self.runtime.clock()):
            lease.in_flight -= 1
            return True
        return False

    def _settle_on_lease(
        self, lease: _Lease, amount: Decimal, outcome: ProviderCallResult | _Failure
    ) -> None:
        """Replace the attempt's upper bound by what it cost (unknown if nothing replied). The
        last attempt to end on a lease returned while attempts were in flight gives back the
        difference between their bounds, which the return kept, and what they cost."""
        if isinstance(outcome, ProviderCallResult):
            lease.committed += outcome.cost_usd - amount
        elif not outcome.holds:
            lease.committed += outcome.cost - amount
        lease.in_flight -= 1
        kept = lease.returned_with
        if kept is not None and lease.in_flight == 0 and lease.committed < kept:
            self._spawn(self._return_lease, lease, "returned")

    async def _renew_lease(self, amount: Decimal) -> None:
        """Extend the lease (or get a first or fresh one) from the keeper."""
        try:
            now = self.runtime.clock()
            lease = self.lease
            if lease is not None and lease.usable_until is not None and now >= lease.usable_until:
                self.lease = None
                await self._return_lease(lease, "returned")  # out of time: start afresh
                lease = None
            if not self._caps_read:
                self._caps_read = await self._read_caps()
                if not self._caps_read:
                    # Asked again after a wait that doubles up to a minute, from when it failed
                    # (a read may take longer than the wait).
                    wait = min(_CAPS_RETRY_MAX_S, _LEASE_RETRY_S * 2**self._caps_failures)
                    self._caps_failures += 1
                    self._lease_retry_at = self.runtime.clock() + timedelta(seconds=wait)
                    return
            lease_id = lease.lease_id if lease is not None else _new_id()
            asked_at = self.runtime.clock()
            reply = await self._ask_lease(lease_id, amount, new=lease is None)
            if (
                reply is not None
                and not reply.granted
                and reply.expires_at is None  # (the keeper holds no such lease)
                and lease is not None
                and self.lease is lease
            ):
                # It expired by the keeper's clock (ahead of this router's), or was taken
                # back. Nothing more is admitted on it.
                log.warning(
                    "router: the budget keeper holds lease %s no more (%s); nothing more is "
                    "admitted on it",
                    lease.lease_id,
                    reply.reason,
                )
                self.lease = None
                await self._return_lease(lease, "returned")
            if reply is None or not reply.granted or reply.expires_at is None:
                self._lease_retry_at = now + timedelta(seconds=_LEASE_RETRY_S)
                return
            self._lease_retry_at = None
            if self.lease is not lease:  # returned while we asked: never admit against it again
                return
            current = self.lease = lease or _Lease(lease_id)
            current.last_grant = reply.granted_usd - current.granted
            current.granted = max(current.granted, reply.granted_usd)
            current.granted_at = now
            # By this router's clock, from when it asked (the keeper's expiry is the keeper's
            # clock: a router behind it by two minutes admitted on a lease the keeper had
            # expired and freed, $1.107 spent of a $1.00 day in a review).
            ttl = timedelta(seconds=self.lease_ttl_s)
            current.usable_until = asked_at + ttl - self.lease_margin
            self._set_tier(reply.tier)
        finally:
            self._asking = False

    async def _read_caps(self) -> bool:
        """Learn every task cap the keeper enforces (:meth:`_lower_cap`), the most recently
        heard of kept when there are more than the router keeps; False (no lease asked for,
        every attempt reserved with the keeper meanwhile) when the keeper did not give them
        all: a lease admits requests naming no cap whose task's cap only the keeper knew."""
        caps: list[tuple[datetime, str, Decimal]] = []
        cursor, restarts = "", 0
        while True:
            why, page = None, None
            try:
                message = await self.runtime.nc.request(
                    subjects.BUDGET_CAPS,
                    encode(BudgetCapsRequest(cursor=cursor)),
                    timeout=self.keeper_timeout_s,
                )
                code = header(message, _SERVICE_ERROR_CODE)
                if code == "409" and cursor and restarts < _CAPS_RESTARTS:
                    # Another run of the keeper answered (it restarted): from the first page.
                    caps, cursor, restarts = [], "", restarts + 1
                    continue
                if code:
                    why = header(message, _SERVICE_ERROR) or f"error {code}"
                else:
                    page = decode(message.data, BudgetCaps)
            except (NoRespondersError, TimeoutError, DecodeError) as exc:
                why = str(exc) or type(exc).__name__
            except ConnectionFailed as exc:  # the server's permissions refuse the subject
                if not self._caps_denied:
                    log.warning("router: %s; it takes no lease (regenerate the permissions)", exc)
                self._caps_denied = True
                return False
            if page is None:
                log.info("router: the keeper's task caps not read (%s); no lease yet", why)
                return False
            caps.extend((as_utc(c.last_at), c.task_id, c.cap_usd) for c in page.caps)
            if not page.cursor:
                break
            cursor = page.cursor
        if len(caps) > _TASK_SPEND_ENTRIES:
            log.warning(
                "router: the keeper enforces %d task caps; this router keeps the %d heard of "
                "last (a request naming no cap, of a task among the others, may be admitted on "
                "its lease)",
                len(caps),
                _TASK_SPEND_ENTRIES,
            )
        for last_at, task_id, cap in sorted(caps)[-_TASK_SPEND_ENTRIES:]:
            self._lower_cap(task_id, cap, last_at)
        log.info("router: %d task caps read from the budget keeper", len(caps))
        return True

    async def _ask_lease(
        self, lease_id: str, amount: Decimal, *, new: bool
    ) -> BudgetLeaseReply | None:
        ask = BudgetLeaseRequest(
            lease_id=lease_id, holder=self.holder, min_usd=amount, ttl_s=self.lease_ttl_s
        )
        try:
            message = await self.runtime.nc.request(
                subjects.BUDGET_LEASE, encode(ask), timeout=self.keeper_timeout_s
            )
        except (NoRespondersError, TimeoutError) as exc:
            log.info("router: no budget lease (%s); reserving per attempt", type(exc).__name__)
            if new and isinstance(exc, TimeoutError):
                # A stalled keeper may still grant it when it comes back: give it back then
                # (the keeper takes this connection's requests in order). An unanswered
                # extension needs nothing: the next grant's total includes it.
                await self._return_lease(_Lease(lease_id), "returned")
            return None
        if header(message, _SERVICE_ERROR_CODE):
            return None
        try:
            return decode(message.data, BudgetLeaseReply)
        except DecodeError as exc:  # this runs in the background: a bad reply must not kill us
            log.warning("router: malformed budget lease reply (%s); reserving per attempt", exc)
            return None

    async def _return_lease(self, lease: _Lease, reason: str) -> None:
        """Stop using ``lease``; the keeper frees all but what it cost or has in flight."""
        if self.lease is lease:
            self.lease = None
        kept = lease.returned_with = max(lease.committed, Decimal(0))
        back = BudgetLeaseReturn(
            lease_id=lease.lease_id,
            holder=self.holder,
            kept_usd=kept,
            reason=reason,  # type: ignore[arg-type]  # "returned" or "revoked"
        )
        await self._give_back(
            subjects.BUDGET_LEASE_RETURN, encode(back), f"lease {lease.lease_id}", traced=False
        )

    def _release(self, reservation_id: str, reason: str) -> None:
        """Give back a reservation, in the background: ``failed`` (its attempt was answered
        with a failure), ``not_called`` (the keeper did not answer in time, or was cut)."""
        release = BudgetRelease(reservation_id=reservation_id, reason=reason)
        self._spawn(self._publish_release, release)

    async def _publish_release(self, release: BudgetRelease) -> None:
        await self._give_back(
            subjects.BUDGET_RELEASE,
            encode(release),
            f"reservation {release.reservation_id}",
            traced=True,
        )

    async def _give_back(self, subject: str, payload: bytes, what: str, *, traced: bool) -> None:
        """Send a release or a lease's return; if no budget keeper takes it, send it again in
        the background for as long as the hold could still be held (:data:`_GIVE_BACK_S`). A
        keeper restarting, overloaded (503) or fenced out (409, another takes its place) does not
        lose it: before, a release sent while no keeper listened was dropped and its hold stayed
        until it expired, its budget unusable meanwhile. Both are idempotent at the keeper (an
        id already closed changes nothing), so sending one again is safe. The first try is
        made here, on this connection, so it follows the grant it gives back and goes ahead of
        whatever the caller sends next (a fresh lease's request after an old one's return)."""
        why = await self._give_back_once(subject, payload, what, traced=traced)
        if why is not None and self._loop is not None:  # (the stop cancels what is left)
            self._spawn(self._give_back_again, subject, payload, what, traced, why)

    async def _give_back_once(
        self, subject: str, payload: bytes, what: str, *, traced: bool
    ) -> tuple[str, bool] | None:
        """One try: None when it is done with (taken, or refused for good), else why not and
        whether the keeper was silent (it may still have it queued: a stalled keeper)."""
        try:
            with tracing.publish_span(subject) if traced else contextlib.nullcontext():
                reply = await self.runtime.nc.request(
                    subject,
                    payload,
                    timeout=self.keeper_timeout_s,
                    headers=tracing.inject() if traced else None,
                )
        except NoRespondersError:
            return "no budget keeper answered", False
        except nats_errors.TimeoutError:
            return f"the budget keeper did not answer in {self.keeper_timeout_s:g} s", True
        except Exception as exc:  # the connection closed (a stop), a permission refused
            log.warning("router: %s not given back (%s); it is freed when it expires", what, exc)
            return None
        code = header(reply, _SERVICE_ERROR_CODE)
        if code is None:
            return None
        if code not in _GIVE_BACK_AGAIN:  # refused for good (a bad request): say so
            log.warning(
                "router: the budget keeper refused to take %s back (%s: %s); it is freed when "
                "it expires",
                what,
                code,
                header(reply, _SERVICE_ERROR) or "",
            )
            return None
        return f"the budget keeper answered {code} ({header(reply, _SERVICE_ERROR) or ''})", False

    async def _give_back_again(
        self, subject: str, payload: bytes, what: str, traced: bool, first: tuple[str, bool]
    ) -> None:
        """:meth:`_give_back`'s further tries: the pause doubles from
        :data:`_GIVE_BACK_FIRST_PAUSE_S` to :data:`_GIVE_BACK_MAX_PAUSE_S`; after a silent
        keeper it is :data:`_GIVE_BACK_SILENT_PAUSE_S` at least (the request it did not answer
        may still wait in its queue: a try every 0.25-5 s sent each hold back 20 times to a
        stalled keeper)."""
        deadline = time.monotonic() + _GIVE_BACK_S
        why, silent = first
        pause = _GIVE_BACK_FIRST_PAUSE_S
        log.info("router: %s not given back yet (%s); trying again", what, why)
        while True:
            wait = max(pause, _GIVE_BACK_SILENT_PAUSE_S) if silent else pause
            if time.monotonic() + wait >= deadline:
                log.warning(
                    "router: %s not given back after %.0f s (%s); it is freed when it expires",
                    what,
                    _GIVE_BACK_S,
                    why,
                )
                return
            await anyio.sleep(wait)
            outcome = await self._give_back_once(subject, payload, what, traced=traced)
            if outcome is None:
                return
            why, silent = outcome
            log.debug("router: %s not given back yet (%s)", what, why)
            pause = min(pause * 2, _GIVE_BACK_MAX_PAUSE_S)

    async def _call(
        self, task: _Task, provider: ProviderConfig, reservation_id: str | None
    ) -> ProviderCallResult | _Failure:
        stream = task.stream_to is not None
        total_ms, first_ms = attempt_timeouts(
            provider,
            task.request,
            stream=stream,
            first_token_timeout_ms=self.first_token_timeout_ms,
        )
        request = task.request
        call = ProviderCall(
            task_id=task.task_id,
            task_type=request.task_type,
            attempt=task.next_number(),
            model=provider.model,
            prompt=request.prompt,
            messages=request.messages,
            system=request.system,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            reservation_id=reservation_id,
            timeout_ms=total_ms,
            first_token_timeout_ms=first_ms,
            stream_to=task.stream_to,
        )
        task.spend_id = _new_id() if reservation_id is not None else None
        started = time.perf_counter()
        outcome = await self._request(
            provider, call, total_ms / 1000 + self.grace_s, task.route_reason, task.spend_id
        )
        latency = (time.perf_counter() - started) * 1000
        task.attempts.append(self._attempt(provider, outcome, latency))
        if isinstance(outcome, _Failure):
            task.reasons.append(f"{outcome.error_class}: {outcome.message}")
        else:
            task.reasons.append("")
        if isinstance(outcome, _Failure):
            task.spent += outcome.cost
        else:
            task.spent += outcome.cost_usd
        return outcome

    async def _request(
        self,
        provider: ProviderConfig,
        call: ProviderCall,
        wait_s: float,
        route_reason: str,
        spend_id: str | None = None,
    ) -> ProviderCallResult | _Failure:
        subject = subjects.provider_call(provider.name)
        try:
            with tracing.request_span(subject) as headers:
                if headers is not None and tracing.recording():  # for the call's span
                    headers[ROUTE_REASON_HEADER] = route_reason
                # When this router stops waiting: a call read later is not made.
                sent = {**(headers or {}), DEADLINE_HEADER: f"{(time.time() + wait_s) * 1000:.0f}"}
                if spend_id is not None:
                    sent[SPEND_ID_HEADER] = spend_id
                message = await self.runtime.nc.request(
                    subject, encode(call), timeout=wait_s, headers=sent
                )
                if (
                    headers is not None
                    and header(message, _SERVICE_ERROR_CODE)
                    and header(message, ERROR_TYPE_HEADER) != CALLER_CANCELLED
                ):
                    # An error reply ends the request's span in error, as the client's does
                    # (not a caller's cancel: nothing failed).
                    current_failed(_reply_code(message.headers or {}, message.data))
        except NoRespondersError:
            return _Failure("no_responders", f"no {provider.name} provider actor is running", True)
        except TimeoutError:
            return _Failure(
                "no_reply",
                f"the {provider.name} provider actor did not reply within {wait_s:.1f} s",
                fallback=True,
                no_reply=True,
            )
        if header(message, _SERVICE_ERROR_CODE):
            unknown = header(message, OUTCOME_HEADER) == "unknown"
            if unknown and header(message, ERROR_CLASS_HEADER) == "timeout":
                # The provider had the request when its time ran out: it may bill it.
                failure = _failure_from(message.headers or {}, message.data)
                failure.billed_unknown = True
                return failure
            if unknown:  # cut by its actor's stop
                return _Failure(
                    "cancelled",
                    f"the {provider.name} provider actor stopped during the call (what the "
                    "provider billed for it is unknown)",
                    fallback=True,
                    no_reply=True,  # its hold stays, as for a call that never answered
                )
            failure = _failure_from(message.headers or {}, message.data)
            own = ERROR_CLASS_HEADER not in (message.headers or {})
            if own and header(message, _SERVICE_ERROR_CODE) not in _NEVER_RAN:
                # Not a provider's error but the actor's own, mid-call (a 500 from a failure
                # inside vapora): whether the provider billed it, or a stream's chunks reached
                # the caller, is unknown. Its hold stays and a stream does not fall back.
                failure.billed_unknown = failure.chunks_unknown = True
            return failure
        try:
            # Up to what the server carries: an answer may be longer than a request may be.
            return decode(message.data, ProviderCallResult, max_bytes=self.runtime.nc.max_payload)
        except DecodeError as exc:
            # The actor answered as for a call made: the provider billed it. Its hold stays
            # until the spend settles it, and no other provider is paid for the same answer.
            failure = _Failure("internal", f"{provider.name}: unreadable reply: {exc}", False)
            failure.billed_unknown = failure.chunks_unknown = True
            return failure

    @staticmethod
    def _attempt(
        provider: ProviderConfig, outcome: ProviderCallResult | _Failure, latency: float
    ) -> Attempt:
        if isinstance(outcome, ProviderCallResult):
            return Attempt(
                provider=provider.name,
                model=outcome.model,
                outcome=Outcome.OK,
                latency_ms=latency,
                cost_usd=outcome.cost_usd,
            )
        timed_out = outcome.error_class in ("timeout", "no_reply")
        return Attempt(
            provider=provider.name,
            model=provider.model,
            outcome=Outcome.TIMEOUT if timed_out else Outcome.ERROR,
            error_code=outcome.error_class,
            latency_ms=latency,
            cost_usd=outcome.cost,
        )


# The provider actor's own error replies for a call that never ran: unreadable (400), or
# refused from a full backlog (503; one cut by a stop says `Vapora-Outcome: unknown`). Any
# other (a 500 from a failure inside vapora, a 504 from a timeout inside it) came mid-call.
_NEVER_RAN = frozenset({"400", "503"})

#: How long a release or a lease's return is sent again while no budget keeper takes it: the
#: shortest life of a hold (a reservation lives 120 s at least), past which the keeper frees it
#: itself. The pauses between tries double from the first to the longest.
_GIVE_BACK_S = 120.0
_GIVE_BACK_FIRST_PAUSE_S = 0.25
_GIVE_BACK_MAX_PAUSE_S = 5.0
_GIVE_BACK_SILENT_PAUSE_S = 15.0
#: Error replies after which a keeper may take it later (overloaded or not yet caught up: 503;
#: fenced out, so another keeper will: 409; a failure inside it, such as the log's: 500).
_GIVE_BACK_AGAIN = frozenset({"409", "500", "503", "504"})

_INSTANCES_REMEMBERED = 64  # per provider: the least recently heard forgotten past it


_NO_FALLBACK = frozenset({"caller_error", "context_overflow", "stream_broken"})
_OVERFLOW = "context_overflow"  # a model's context window too small: the next model may do


def _request_error(exc: DecodeError) -> VaporaError:
    """A ``CompletionRequest`` that cannot be read (see :func:`vapora.errors.request_error`)."""
    return request_error(str(exc))


def _reply_code(headers: dict[str, str], data: bytes) -> str:
    """The contract code of an error reply (its class when the body is unreadable)."""
    try:
        return decode(data, ErrorReply).error.code
    except DecodeError:
        return headers.get(ERROR_CLASS_HEADER, "internal")


def _failure_from(headers: dict[str, str], data: bytes) -> _Failure:
    """A provider actor's error reply (see :mod:`actors.provider` for the headers)."""
    error_class = headers.get(ERROR_CLASS_HEADER, "internal")
    try:
        message = decode(data, ErrorReply).error.message
    except DecodeError:
        message = headers.get(_SERVICE_ERROR, "provider error")
    usage = Usage()
    if USAGE_HEADER in headers:
        with contextlib.suppress(msgspec.DecodeError):
            usage = msgspec.json.decode(headers[USAGE_HEADER], type=Usage)
    billed = Decimal(headers.get(COST_HEADER, "0"))
    if RETRY_AFTER_HEADER in headers:
        message = f"{message} (retry after {headers[RETRY_AFTER_HEADER]} s)"
    return _Failure(
        error_class=error_class,
        message=message,
        fallback=error_class not in _NO_FALLBACK,
        usage=usage,
        cost=billed if billed.is_finite() else Decimal(0),
        error_type=headers.get(ERROR_TYPE_HEADER),
    )


# --- observability: metrics and log lines of decisions -------------------------------------------


def route_reason_class(request: CompletionRequest, decision: RouteDecision) -> str:
    """The guide's low-cardinality reason of a decision: ``override``, ``budget`` (a tier other
    than Normal shaped it), ``last_resort`` (a zero-cost provider outside the mapping) or
    ``rules`` (the mapping and the score)."""
    if request.provider is not None:
        return "override"
    if decision.tier is not Tier.NORMAL:
        return "budget"
    if "last resort" in decision.reason:
        return "last_resort"
    return "rules"


_TIER_ACTIONS = {Tier.NEAR_THRESHOLD: "prefer_cheapest", Tier.EXCEEDED: "zero_cost_only"}


def _observe_decision(request: CompletionRequest, decision: RouteDecision) -> None:
    # One INFO line per decision (its task and trace ids added by the log format), as the
    # route_decided event has it: the operator's view of what was routed where and why.
    log.info("route %s: %s", " -> ".join(decision.chain), decision.reason)
    metrics = telemetry.STATE.metrics
    if metrics is None:
        return
    selected = decision.chain[0] if decision.chain else "none"
    reason = route_reason_class(request, decision)
    metrics.record_decision(selected, request.task_type.value, reason)
    action = _TIER_ACTIONS.get(decision.tier)
    if action is not None:
        metrics.record_enforcement(decision.tier.value, action)


def _observe_refusal(
    request: CompletionRequest, refused: RouteOverBudget | RouteUnavailable
) -> None:
    log.info("no route: %s", refused.message)
    metrics = telemetry.STATE.metrics
    if metrics is None:
        return
    over_budget = isinstance(refused, RouteOverBudget)
    task_type = request.task_type.value
    metrics.record_decision("none", task_type, "budget" if over_budget else "unavailable")
    if over_budget:
        metrics.record_enforcement(refused.decision.tier.value, "rejected")


def _observe_fallback(name: str, following: str | None, failure: _Failure) -> None:
    log.info(
        "fallback %s -> %s (%s: %s)",
        name,
        following or "none",
        failure.error_class,
        failure.message,
    )
    if telemetry.STATE.metrics is not None:
        telemetry.STATE.metrics.record_fallback(name, following or "none", failure.error_class)


def _observe_enforcement(tier: Tier, action: str) -> None:
    if telemetry.STATE.metrics is not None:
        telemetry.STATE.metrics.record_enforcement(tier.value, action)
