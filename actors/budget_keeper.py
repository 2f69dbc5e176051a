"""The budget keeper: the single writer of the budget subject (DESIGN §2, §4).

Endpoints (one micro service, queue group ``budget``):

* ``vapora.budget.reserve`` (:class:`BudgetReserve` -> :class:`BudgetReserveReply`): admission is
  one critical section under an :class:`anyio.Lock`: decide with :func:`vapora.budget.admit`,
  append ``budget_reserved`` fenced on the budget subject, fold the event into the state, then
  release the lock. No other admission can interleave between the check and the reservation.
* ``vapora.budget.release`` (:class:`BudgetRelease` -> :class:`BudgetStatus`): appends
  ``budget_released``; releasing a reservation that is unknown or already closed is a no-op.
* ``vapora.budget.lease`` (:class:`BudgetLeaseRequest` -> :class:`BudgetLeaseReply`): grants a
  router a lease of budget (or extends its open one) sized by :func:`vapora.budget.lease_size`,
  under the same lock and fence as a reservation: ``budget_leased`` is appended before the reply.
  The router then admits paid attempts against it locally, with no round trip each. Nothing is
  leased when the tier is Exceeded or ``[budget] lease_cents = 0``.
* ``vapora.budget.lease.return`` (:class:`BudgetLeaseReturn` -> :class:`BudgetLeaseReply`):
  appends ``budget_lease_returned``: the holder keeps what it spent or has in flight, the rest
  is free again.
* ``vapora.budget.caps`` (:class:`BudgetCapsRequest` -> :class:`BudgetCaps`): the task caps it
  enforces, a page at a time: a router reads them before it admits anything on a lease.
* ``vapora.budget`` (``{}`` -> :class:`BudgetStatus`).

State and the log
    The state is :func:`vapora.budget.evolve` folded over the whole log. A follower tails every
    event (spend from the provider actors settles reservations) and applies it with its stream
    sequence. Our own events are folded *twice*: once right after JetStream acknowledged the
    append (so the next admission, still under the lock, sees the hold), without a sequence, and
    once more when the tail brings them back, with their sequence. The second application is a
    no-op by the fold's own rules (a ``budget_reserved`` whose id is open or closed, a
    ``budget_released`` of a closed id, change nothing), so whichever comes first counts. We do
    *not* advance ``last_sequence`` at append time: that would make the tail skip other
    writers' events that landed just before ours (a spend at ``seq - 1``).

    The replay at start decodes each event into the view of the fields the fold reads
    (``vapora/budget_view.py``); the tail decodes whole events. An event the whole decoder
    rejects for a field the fold does not read (a task type a newer writer added during a
    rolling upgrade, a token count out of range, no price) is read again from the log as a
    view, counted in ``money_only`` and logged: a live keeper counts the same money as a
    restarted one, never less. ``budget_tier_changed`` folds into the state too
    (``state.announced``), so :func:`vapora.budget.status` reports the tier enforced.

Fencing
    Every append carries ``Nats-Expected-Last-Subject-Sequence`` = the last sequence on the
    budget subject that the state includes. A budget event that we did not write (seen by the
    tail, or found after the server refused an append) means a second keeper is running: this
    keeper logs it loudly and stops writing for good (requests get 409 ``conflict``, never an
    admission); the status keeps answering from the log. An append whose outcome is unknown
    (timeout, server restart) makes the next write re-synchronise first: it waits until the tail
    has applied everything on the budget subject and adopts it if every such event is ours.

Tiers, expiry, snapshots (the housekeeping task, every ``tick_s`` from the runtime clock)
    The tier is compared before and after each event; a change is appended as
    ``budget_tier_changed`` whose ``causation_id`` is the event that moved it (a change that no
    event caused, such as a new UTC day emptying the daily window, has none). Reservations past
    their expiry are released with reason ``expired``; leases past theirs are returned with
    reason ``expired`` (their holder died or stopped renewing). The state is written to
    ``<data_dir>/budget.snapshot`` (temporary file + rename) after ``snapshot_every`` events or
    ``snapshot_interval_s`` seconds with changes, and on stop; on start the keeper restores it
    and replays only the tail, so restart time does not grow with the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args, get_type_hints

import anyio
import anyio.abc
import msgspec
from nats.js.errors import NotFoundError

from actors import tracing
from actors.eventlog import LogEntry, ReplayBatch, Unreadable
from actors.follow import LogFollower
from actors.runner import Runtime, utc_now
from actors.service import ActorService, Endpoint, RequestContext, reply_room
from events import subjects
from events.codec import MAX_MESSAGE_BYTES, DecodeError, decode, encode, event_tag
from events.contract import (
    MAX_ID_LENGTH,
    BudgetCaps,
    BudgetCapsRequest,
    BudgetLeaseReply,
    BudgetLeaseRequest,
    BudgetLeaseReturn,
    BudgetPending,
    BudgetRelease,
    BudgetReserve,
    BudgetReserveReply,
    BudgetStatus,
    BudgetStatusRequest,
    TaskCap,
    Tier,
    check_amount,
)
from events.log import (
    BudgetLeased,
    BudgetLeaseReturned,
    BudgetReleased,
    BudgetReserved,
    BudgetTierChanged,
    Event,
    SpendRecorded,
)
from vapora import budget
from vapora.budget import BudgetLimits, BudgetState
from vapora.budget_view import (
    FOLDED,
    BudgetLeasedView,
    BudgetReleasedView,
    BudgetReservedView,
    BudgetTierChangedView,
    LeaseReturnedView,
    SpendRecordedView,
    View,
    decode_view,
    decode_views,
)
from vapora.config import BudgetConfig
from vapora.errors import ConcurrencyConflict, InvalidRequest, NoProviderAvailable, VaporaError
from vapora.telemetry import TASK_ID
from vapora.telemetry.instruments import watch_budget

__all__ = ["SNAPSHOT_FILE", "BudgetKeeper", "limits_of"]

log = logging.getLogger("vapora.budget")

SNAPSHOT_FILE = "budget.snapshot"
_RELEASE_REASONS = frozenset(get_args(get_type_hints(BudgetReleased)["reason"]))
#: How long a give-back waits for the tail to read the log to its end (see _read_to_end).
_READ_TO_END_S = 1.5
#: How long (steady seconds) the wall clock must stay ahead of the steady one before the keeper
#: takes it as it is: the longest a hold lives (a reservation's TTL is at most an hour).
_STEP_TRUSTED_S = 3600.0


def _boot_seconds() -> float:
    """Seconds that move on at their pace and count a suspended machine's sleep too (Linux's
    ``CLOCK_BOOTTIME``; ``time.monotonic`` elsewhere): a VM resumed is not a step."""
    return time.clock_gettime(_BOOT_CLOCK)


_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
#: Room kept in a page of task caps (vapora.budget.caps) below the largest reply.
_CAPS_MARGIN = 4096
#: The endpoints that write (a fenced-out keeper withdraws them); ``status`` only reads.
_WRITING_ENDPOINTS = ("reserve", "release", "lease", "lease_return")
_MONEY_EVENTS = (SpendRecorded, BudgetReserved, BudgetReleased, BudgetLeased, BudgetLeaseReturned)
#: An event stamped further ahead of the keeper's clock than this names a host with a wrong clock.
_AHEAD = timedelta(minutes=5)
_BEHIND = timedelta(minutes=1)  # a spend stamped this long before its reservation's admission
_AHEAD_EVERY = timedelta(minutes=1)  # said at most this often
#: The keeper's clock against the NATS server's: compared at most this often (steady seconds),
#: said when they differ by more than ``_SKEWED`` (at most every ``_SKEW_EVERY_S``).
_SKEW_CHECK_S = 60.0
_SKEWED = timedelta(minutes=1)
_SKEW_EVERY_S = 600.0
_SKEW_ASK_S = 1.0  # how long the stored time is waited for
_SKEW_SAMPLE_S = 5.0  # an event whose append took longer is not compared (resent, queued)
_MONEY_VIEWS = (
    SpendRecordedView,
    BudgetReservedView,
    BudgetReleasedView,
    BudgetLeasedView,
    LeaseReturnedView,
)
_MONEY = _MONEY_EVENTS + _MONEY_VIEWS
_TIER_CHANGES = (BudgetTierChanged, BudgetTierChangedView)
_PROBLEM_SHOWN = 200  # characters of a decoding problem in the log
_REREADS = 3  # tries at reading an unreadable money message again before passing it by
_REREADS_AT_ONCE = 64  # money messages passed by read again at a start, at once
_OWN_IDS_KEPT = 100_000  # ids of our appends not yet seen back in the log (bounded)
_PENDING_S = 60.0  # a provider actor's word that it holds a hold's spend stands this long
_PENDING_REMEMBERED = 100_000


def limits_of(config: BudgetConfig) -> BudgetLimits:
    """The configured budget (cents) as :class:`BudgetLimits` (USD)."""
    return BudgetLimits.from_cents(
        daily_cents=config.daily_limit_cents,
        monthly_cents=config.monthly_limit_cents,
        per_task_cents=config.per_task_limit_cents,
        warn_threshold_percent=config.warn_threshold_percent,
    )


class _SnapshotFile(msgspec.Struct, kw_only=True):
    """What ``budget.snapshot`` holds: the fold's snapshot plus the keeper's own position."""

    version: int = 1
    stream: str
    fence: int
    announced: Tier
    state: bytes
    # When the stream was made: a stream of the same name made again (or another server's) is
    # not the one snapshotted. None in snapshots written before it was kept.
    stream_created: datetime | None = None
    #: Sequences of money messages this keeper could not read and passed by (a newer
    #: writer's): read again at the next start (version 2 on).
    passed_by: list[int] = []


#: The snapshot version this keeper writes. An earlier one does not say what its keeper passed
#: by unread: the log is replayed from its start instead (once, at the upgrade).
_SNAPSHOT_VERSION = 2
#: Money messages passed by unread, remembered to be read again at a start (past it, the
#: oldest are forgotten and said in the log).
_PASSED_BY_KEPT = 10_000


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(_SnapshotFile)


class BudgetKeeper:
    """The budget keeper actor (``vapora actor budget``)."""

    name = "budget"

    def __init__(
        self,
        runtime: Runtime,
        *,
        tick_s: float = 1.0,
        snapshot_every: int = 10_000,
        snapshot_interval_s: float = 30.0,
        resync_timeout_s: float = 5.0,
        expiry_grace_s: float = 15.0,
        steady: Callable[[], float] | None = None,
        check_clock: bool | None = None,
    ) -> None:
        self.runtime = runtime
        self.log = runtime.log
        self.clock = runtime.clock
        #: Seconds that only ever move on at their pace (:func:`_boot_seconds` with the real
        #: clock): holds expire by the wall clock only as far as these seconds say time has
        #: passed since the start, so a wall clock stepped forward (NTP, a VM resumed) does not
        #: expire holds whose calls still run. None with another clock (tests move theirs).
        if steady is None and runtime.clock is utc_now:
            steady = _boot_seconds
        self._steady = steady
        self._steady_base: tuple[datetime, float] | None = None  # (wall, steady) at the start
        self._ahead_since: float | None = None  # (steady) since when the wall clock is ahead
        self._ahead_gap = 0.0  # by how much (seconds), then
        self.limits = limits_of(runtime.config.budget)
        self.lease_usd = runtime.config.budget.lease_usd
        self.subject = subjects.event_subject("budget_reserved", None, runtime.log.settings.prefix)
        # Subjects whose events carry money (spend_recorded; the budget's own): an unreadable
        # message on any other is passed by without being read again.
        prefix = runtime.log.settings.prefix
        self._money_subjects = (f"{prefix}.spend.", f"{prefix}.budget")
        self.snapshot_path = Path(runtime.data_dir) / SNAPSHOT_FILE
        self.tick_s = tick_s
        self.snapshot_every = snapshot_every
        self.snapshot_interval_s = snapshot_interval_s
        self.resync_timeout_s = resync_timeout_s
        #: No hold expires within this long of the keeper's start or of an append the log
        #: refused: a provider actor holds the spend the log would not take, appends it again
        #: every 2 s and says so (``vapora.budget.pending``); a keeper that just started has
        #: not heard it yet.
        self.expiry_grace = timedelta(seconds=expiry_grace_s)
        self._quiet_since: float | None = None  # (steady) the start, or the last refused append
        #: Money messages passed by unread (see _SnapshotFile.passed_by), oldest first.
        self._passed_by: dict[int, None] = {}
        #: Holds whose spend a provider actor holds, and until when that word stands.
        self._pending: dict[str, datetime] = {}
        # The live budget: one fold the tail and our own appends write in place; ``state`` is a
        # view of it (see :meth:`state`).
        #: How long an idle task's spend and cap are kept (``[budget] task_retention_hours``).
        self.task_retention = runtime.config.budget.task_retention
        self._fold = budget.Fold(self._retaining(budget.EMPTY))
        self._run = uuid.uuid4().hex[:12]  # names this run in the caps' cursors
        self._view: BudgetState | None = None
        self.fence = 0  # the last sequence on the budget subject that `state` includes
        self.fenced_out: str | None = None  # why we stopped writing, once another keeper wrote
        self.restored_sequence: int | None = None  # the snapshot's sequence, if one was used
        self.replayed_events = 0  # events read from the log at start (after the snapshot)
        self.overruns = 0  # spends past the reservation they settled (each logged)
        # events the whole decoder rejected, read live from their money fields (each logged)
        self.money_only = 0
        self._rereads = (0, 0)  # (sequence, failed tries) at reading that message again
        self._withdrawn = False  # the writing endpoints withdrawn, once fenced out
        self._stream_created: datetime | None = None  # of the stream this keeper reads
        self._snapshot_stream_created: datetime | None = None  # of the one the snapshot read
        self.ahead = 0  # events stamped more than _AHEAD past the keeper's clock
        self._ahead_said: datetime | None = None
        self.behind = 0  # spends stamped more than _BEHIND before their reservation
        self._behind_said: datetime | None = None
        #: Whether this keeper's clock is compared with the NATS server's (:meth:`_compare_clocks`;
        #: None: with the real clock only, tests set theirs anywhere), and what it found: the
        #: last event it wrote ``(sequence, its time)``, the last compared, when (steady), the
        #: difference (keeper minus server) and when it was last said.
        self._check_clock = runtime.clock is utc_now if check_clock is None else check_clock
        self._written: tuple[int, datetime] | None = None
        self._compared: int | None = None
        self._compared_at: float | None = None
        self.clock_skew: timedelta | None = None
        self._skew_said: float | None = None
        self._lock = anyio.Lock()
        self._own: OrderedDict[str, None] = OrderedDict()
        self._ready = False
        self._needs_resync = False
        self._tier_cause: str | None = None
        #: The tailed event behind ``_tier_cause``: its id, subject, stored headers and task.
        self._tier_cause_entry: tuple[str, str, bytes | None, str | None] | None = None
        self._wake = anyio.Event()
        self._applied = anyio.Event()
        self._stopping = anyio.Event()
        self._service: ActorService | None = None
        self._changed = 0
        self._snapshot_time = time.monotonic()
        # What /metrics reports as spent today and this month (vapora_budget_spent_usd): set on
        # the loop at start and at each housekeeping tick, read by a collecting thread as is.
        self._spent_now: tuple[tuple[str, Decimal], ...] = ()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Rebuild from the snapshot and the log, then serve until :meth:`stop`."""
        started = time.monotonic()
        self._expiry_now()  # (the steady clock's base: the start)
        await self.log.ensure_stream()
        self._restore_snapshot()
        await self._catch_up()
        await self._read_passed_by()
        follower = LogFollower(
            self.log, name="budget keeper", apply=self._apply_tail, position=self._position
        )
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            self._ready = True
            self._quiet_since = self._steady_now()
            async with self._lock:
                with contextlib.suppress(VaporaError):  # retried by the housekeeping
                    await self._announce_tier(self._tier_cause)
            self._service = self._make_service()
            self._note_spend()
            unwatch = watch_budget(self._spent)
            # Provider actors holding spend the log refused say so here (BudgetPending).
            pending = await self.runtime.nc.subscribe(subjects.BUDGET_PENDING, cb=self._on_pending)
            try:
                served = anyio.Event()
                await tg.start(_serve, self._service, served)
                tg.start_soon(self._housekeeping)
                log.info(
                    "budget keeper ready in %.3f s: snapshot at sequence %s, %d events replayed, "
                    "log at %d, tier %s",
                    time.monotonic() - started,
                    self.restored_sequence,
                    self.replayed_events,
                    self.state.last_sequence,
                    self.announced,
                )
                task_status.started()
                await self._stopping.wait()
                self._service.stop()
                # Never cancel the service mid-drain: nats-py's read loop dies if a flush it is
                # waiting on is cancelled and its PONG arrives afterwards.
                with anyio.move_on_after(15):
                    await served.wait()
                with anyio.move_on_after(2):  # let our last appends come back through the tail
                    await self._until(self._quiescent)
                with anyio.move_on_after(10):
                    async with self._lock:
                        await self._write_snapshot()
            finally:
                with contextlib.suppress(Exception):
                    await pending.unsubscribe()
                unwatch()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop serving, drain, write a last snapshot and return from :meth:`run`."""
        self._stopping.set()

    def _make_service(self) -> ActorService:
        group = "budget"
        return ActorService(
            self.runtime.nc,
            name="vapora-budget",
            reserved_replies=(self.runtime.log.settings.prefix + ".",),
            description="budget keeper: reservations, spend, tiers",
            endpoints=[
                Endpoint(
                    name="reserve",
                    subject=subjects.BUDGET_RESERVE,
                    request_type=BudgetReserve,
                    handler=self.reserve,
                    queue_group=group,
                    timeout=30.0,
                ),
                Endpoint(
                    name="release",
                    subject=subjects.BUDGET_RELEASE,
                    request_type=BudgetRelease,
                    handler=self.release,
                    queue_group=group,
                    timeout=30.0,
                ),
                Endpoint(
                    name="lease",
                    subject=subjects.BUDGET_LEASE,
                    request_type=BudgetLeaseRequest,
                    handler=self.lease,
                    queue_group=group,
                    timeout=30.0,
                ),
                Endpoint(
                    name="lease_return",
                    subject=subjects.BUDGET_LEASE_RETURN,
                    request_type=BudgetLeaseReturn,
                    handler=self.lease_return,
                    queue_group=group,
                    timeout=30.0,
                ),
                Endpoint(
                    name="caps",
                    subject=subjects.BUDGET_CAPS,
                    request_type=BudgetCapsRequest,
                    handler=self.caps,
                    queue_group=group,
                    timeout=30.0,
                ),
                Endpoint(
                    name="status",
                    subject=subjects.BUDGET,
                    request_type=BudgetStatusRequest,
                    handler=self.status,
                    queue_group=group,
                    timeout=5.0,
                ),
            ],
        )

    # --- the state ----------------------------------------------------------------------------

    @property
    def state(self) -> BudgetState:
        """The budget now: a view of the live fold, to read between two awaits, never to keep
        across one (:meth:`_write_snapshot` takes a frozen copy)."""
        if self._view is None:
            self._view = self._fold.view()
        return self._view

    @property
    def announced(self) -> Tier:
        """The tier of the last ``budget_tier_changed`` (ours, or in the log): the one the
        hysteresis of :meth:`_tier_now` starts from."""
        return self._fold.announced

    def _reset(self, state: BudgetState) -> None:
        self._fold, self._view = budget.Fold(self._retaining(state)), None

    def _retaining(self, state: BudgetState) -> BudgetState:
        return dataclasses.replace(state, task_retention=self.task_retention)

    def _fold_in(self, event: Event | View, seq: int | None = None) -> None:
        if seq is None:
            self._fold.apply_event(event)
        else:
            self._fold.apply([(event, seq)])
        self._view = None

    # --- rebuilding -------------------------------------------------------------------------

    def _restore_snapshot(self) -> None:
        try:
            data = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            return
        try:
            saved = _snapshot_decoder.decode(data)
            state = budget.restore(saved.state)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning(
                "budget keeper: ignoring unreadable snapshot %s: %s", self.snapshot_path, exc
            )
            return
        if saved.stream != self.log.settings.name:
            log.warning("budget keeper: snapshot is of stream %s; ignoring it", saved.stream)
            return
        if saved.version < _SNAPSHOT_VERSION:
            # Its keeper may have passed by a newer writer's spend it could not read, and its
            # snapshot moved past it: restored, that spend would never count (a review, an
            # upgrade from a day-old version: the day's spend short by three calls for good).
            log.warning(
                "budget keeper: snapshot %s was written by an earlier version; replaying the "
                "log from its start (once)",
                self.snapshot_path,
            )
            return
        # (a sequence past the state's is read again by the replay that follows)
        self._passed_by = dict.fromkeys(q for q in saved.passed_by if q <= state.last_sequence)
        # The keeper's own record of the tier (snapshots of the state before it kept one).
        self._reset(dataclasses.replace(state, announced=saved.announced))
        self.fence = saved.fence
        self.restored_sequence = state.last_sequence
        self._snapshot_stream_created = saved.stream_created

    async def _catch_up(self) -> None:
        """Fold the log after the snapshot, in bulk: the fast path of a restart."""
        info = await self.log.js.stream_info(self.log.settings.name)
        self._stream_created = info.created
        if self.restored_sequence is not None:
            why = None
            if int(info.state.last_seq) < self.restored_sequence:
                why = "is ahead of the log"
            elif self._snapshot_stream_created not in (None, info.created):
                why = f"is of a stream made at {self._snapshot_stream_created}, not {info.created}"
            if why is not None:  # the stream is not the one we snapshotted
                log.warning("budget keeper: snapshot %s; replaying the log from its start", why)
                self._reset(budget.EMPTY)
                self._passed_by = {}  # (the discarded snapshot's: the replay finds its own)
                self.fence = 0
                self.restored_sequence = None
        # Each event is decoded into the view of the fields the fold reads (vapora/budget_view.py).
        # Not filtered to the budget's subjects: a consumer with several subject filters is
        # delivered at ~100,000 events/s by nats-server here, slower than reading them all.
        fold = self._fold
        async for batch in self.log.replay_batches(decode_views, fold.last_sequence + 1):
            self._note_batch(batch)
            self._note_passed_by(batch)
            fold.apply_sequenced(batch.seqs, batch.events)
            self._view = None
            self.replayed_events += len(batch)
            self._changed += len(batch)
            self._tier_cause = _last_money_event(batch.events) or self._tier_cause

    def _note_passed_by(self, batch: ReplayBatch[View]) -> None:
        """Remember the money messages of a replay's batch that did not read (to read again)."""
        events: list[Any] = batch.events  # (a message that did not read: Unreadable)
        if Unreadable not in set(map(type, events)):  # (the common case, at C speed)
            return
        for seq, message, event in zip(batch.seqs, batch.messages, events, strict=True):
            if type(event) is Unreadable and message[0].decode().startswith(self._money_subjects):
                self._pass_by(seq)

    def _pass_by(self, seq: int) -> None:
        self._passed_by[seq] = None
        if len(self._passed_by) > _PASSED_BY_KEPT:
            oldest = next(iter(self._passed_by))
            del self._passed_by[oldest]
            log.error(
                "budget keeper: more than %d money messages passed by unread; sequence %d is "
                "no longer read again at a start",
                _PASSED_BY_KEPT,
                oldest,
            )

    async def _read_passed_by(self) -> None:
        """Fold the money messages passed by unread that read now (this version knows what an
        earlier one did not); the others stay remembered."""
        folded = 0
        read: dict[int, bytes] = {}
        limiter = anyio.CapacityLimiter(_REREADS_AT_ONCE)  # (10,000 one by one: a minute)

        async def read_one(seq: int) -> None:
            async with limiter:
                try:
                    read[seq] = await self._stored(seq)
                except Exception as exc:  # read again at the next start
                    log.warning("budget keeper: sequence %d not read again: %s", seq, exc)

        async with anyio.create_task_group() as tg:
            for seq in self._passed_by:
                tg.start_soon(read_one, seq)
        for seq, data in sorted(read.items()):
            try:
                view = decode_view(data) if data else None
            except DecodeError:
                continue
            del self._passed_by[seq]
            if view is not None and isinstance(view, FOLDED):
                self._fold_in(view)
                folded += 1
        if folded:
            log.warning(
                "budget keeper: %d money events passed by unread before read now; counted",
                folded,
            )

    def _note_batch(self, batch: ReplayBatch[View]) -> None:
        """:meth:`_note` for the events on the budget subject (a replay's fast path)."""
        subject = self.subject.encode()
        for seq, message, event in zip(batch.seqs, batch.messages, batch.events, strict=True):
            if message[0] == subject:
                self._note(LogEntry(seq, message[0].decode(), event, message[3]))

    def _note(self, entry: LogEntry[Event] | LogEntry[View]) -> None:
        """Keep the fence in step with the log (the announced tier is folded into the state)."""
        if entry.subject != self.subject:
            return
        event: Any = entry.event  # an event, or its view (which has the fields read here)
        if type(event) is Unreadable or (isinstance(event, View) and not isinstance(event, FOLDED)):
            # Not a writer's event (nor one of the budget's, read for its money): passed by,
            # the fence moved past it.
            self.fence = max(self.fence, entry.seq)
            return
        mine = self._own.pop(event.id, False) is None
        if entry.seq <= self.fence:
            return
        if self._ready and not mine:
            self._fence_out(
                f"another writer appended {event.id} at sequence {entry.seq} on {self.subject}"
            )
        self.fence = entry.seq

    def _position(self) -> int:
        return self.state.last_sequence

    async def _apply_tail(self, batch: list[LogEntry[Event]]) -> None:
        """Fold the money events and tier changes of a live batch one by one, noting the one that
        moved the tier, then the batch's last event for the position. An event the whole
        decoder rejected is read again for its money first."""
        now = self.clock()
        for logged in batch:
            # Read again for its money: only an event the whole decoder rejected.
            rejected: Any = logged.event
            entry = logged if type(rejected) is not Unreadable else await self._readable(logged)
            self._note(entry)
            event = entry.event
            if not isinstance(event, _MONEY):
                if isinstance(event, _TIER_CHANGES):  # the announced tier is in the state
                    self._fold_in(event, entry.seq)
                continue  # (its position is folded with the batch's last, below)
            if isinstance(event, SpendRecorded | SpendRecordedView) and event.reservation_id:
                self._check_overrun(event)
            if budget.as_utc(event.at) > now + _AHEAD:  # naive: taken at its word
                self._say_ahead(event, now)
            self._fold_in(event, entry.seq)
            if self._tier_now(now) != self.announced:
                self._tier_cause = event.id
                # Announced later (housekeeping): in the trace, and with the task, of the event.
                task_id = getattr(event, "task_id", None)
                self._tier_cause_entry = (event.id, entry.subject, entry.raw_headers, task_id)
                self._wake.set()
        last = batch[-1]
        self._fold_in(last.event, last.seq)  # the position, whatever the last event was
        self._changed += len(batch)
        # Every waiter wakes (each looks again); the next batch wakes them on a new event.
        applied, self._applied = self._applied, anyio.Event()
        applied.set()

    async def _readable(self, entry: LogEntry[Event]) -> LogEntry[Event] | LogEntry[View]:
        """``entry``, or for an event the whole decoder rejected, the view of it that the replay
        at start folds (``vapora/budget_view.py``): its money counts live as after a restart.
        A view whose amounts no sum can take is passed by by the fold on both paths alike."""
        unreadable: Any = entry.event
        if not entry.subject.startswith(self._money_subjects):
            return entry  # only spend and budget events carry money: the others are passed by
        try:
            with anyio.fail_after(self.resync_timeout_s):
                data = await self._stored(entry.seq)
        except Exception as exc:
            # Failing, the tail is read again from here, a few times; then it is passed by
            # (logged), not waited on for good: every later spend would go uncounted.
            tries = (self._rereads[1] if self._rereads[0] == entry.seq else 0) + 1
            if tries < _REREADS:
                self._rereads = (entry.seq, tries)
                raise
            self._rereads = (0, 0)
            log.error(
                "budget keeper: %s at sequence %d is not a whole event and could not be read "
                "again for its money (%s: %s, %d tries); passed by: any money in it is not "
                "counted until a restart",
                entry.subject,
                entry.seq,
                type(exc).__name__,
                exc,
                tries,
            )
            self._pass_by(entry.seq)
            return entry
        self._rereads = (0, 0)
        try:
            view = decode_view(data)
        except DecodeError:
            self._pass_by(entry.seq)
            return entry  # not readable for its money either: passed by on both paths
        if not isinstance(view, FOLDED):
            self._pass_by(entry.seq)
            return entry
        self.money_only += 1
        log.warning(
            "budget keeper: %s %s at sequence %d (%s) is not a whole event (%s); its money "
            "fields are, and count as a restarted keeper counts them (%d such events so far)",
            event_tag(view),
            getattr(view, "id", "?"),
            entry.seq,
            entry.subject,
            str(unreadable.problem)[:_PROBLEM_SHOWN],
            self.money_only,
        )
        return LogEntry(entry.seq, entry.subject, view, entry.raw_headers)

    async def _stored(self, seq: int) -> bytes:
        """The message stored at ``seq`` as written (empty if it is gone from the log, as it is
        for a replay)."""
        message = await self.log.stored(seq)
        return (message.data or b"") if message is not None else b""

    def _say_ahead(self, event: Event | View, now: datetime) -> None:
        """An event from the future: its day is the one it names (DESIGN §4), so a host whose
        clock is wrong bills the wrong day. Counted; said once a minute at most."""
        self.ahead += 1
        if self._ahead_said is not None and now - self._ahead_said < _AHEAD_EVERY:
            return
        self._ahead_said = now
        log.warning(
            "budget keeper: %s %s is stamped %s, %s ahead of this keeper's clock: check the "
            "clock of the host that wrote it (%d such events so far)",
            event_tag(event),
            event.id,  # type: ignore[union-attr]  # every money event and view has both
            event.at.isoformat(),  # type: ignore[union-attr]
            budget.as_utc(event.at) - now,  # type: ignore[union-attr]
            self.ahead,
        )

    def _say_behind(self, spend: SpendRecorded | SpendRecordedView, admitted: datetime) -> None:
        """A spend stamped before its reservation was admitted (by this keeper's clock): its
        writer's clock is behind. It counts in the day it names (DESIGN §4): a day behind, in
        a day no limit checks any more. Counted; said once a minute at most."""
        self.behind += 1
        now = self.clock()
        if self._behind_said is not None and now - self._behind_said < _AHEAD_EVERY:
            return
        self._behind_said = now
        log.warning(
            "budget keeper: spend %s is stamped %s, %s before its reservation %s was admitted: "
            "the clock of the host that wrote it is behind; it counts in the day it names, "
            "where the limits may no longer hold it (%d such spends so far)",
            spend.id,
            spend.at.isoformat(),
            admitted - budget.as_utc(spend.at),
            spend.reservation_id,
            self.behind,
        )

    def _check_overrun(self, spend: SpendRecorded | SpendRecordedView) -> None:
        """A spend past the reservation it settles: the hold was meant to be the attempt's
        upper bound, so the limits may now be exceeded. Counted, and said once per spend.
        (A view's cost is unchecked: one no sum can take is passed by by the fold, not here.)
        Also a spend stamped before its reservation was admitted (:meth:`_say_behind`)."""
        assert spend.reservation_id is not None
        held = self.state.reservation(spend.reservation_id)
        if held is not None and budget.as_utc(spend.at) < held.reserved_at - _BEHIND:
            self._say_behind(spend, held.reserved_at)
        if held is None or not _usable(spend.cost_usd) or spend.cost_usd <= held.amount_usd:
            return
        self.overruns += 1
        log.warning(
            "budget keeper: spend %s of task %s cost $%s, past the $%s its reservation %s held "
            "(the estimate of the attempt's upper bound was short)",
            spend.id,
            spend.task_id,
            spend.cost_usd,
            held.amount_usd,
            spend.reservation_id,
        )

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait (the caller bounds how long) until the tail has made ``done()`` true."""
        while not done():
            await self._applied.wait()  # several wait at once (give-backs): one event each

    # --- endpoints --------------------------------------------------------------------------

    async def reserve(self, request: BudgetReserve, ctx: RequestContext) -> BudgetReserveReply:
        """Admit or refuse ``request``; an admission is appended before it is answered."""
        rid = request.reservation_id
        _check_id("reservation_id", rid)
        TASK_ID.set(request.task_id)  # this handler's task: its log lines name it
        _check_id("task_id", request.task_id)
        async with self._lock:
            await self._writable()
            now = self.clock()
            admission = budget.admit(self.state, self.limits, request, now)
            if (
                admission.admitted
                and request.amount_usd > 0
                and self.state.reservation(rid) is None
                and self._tier_now(now) is Tier.EXCEEDED
            ):
                # Exceeded admits zero-cost providers only (DESIGN §4): a router that decided
                # before the tier reached it still asks for a paid attempt.
                admission = budget.Admission(
                    False, "the budget tier is Exceeded: only zero-cost providers are admitted"
                )
            if admission.admitted and self.state.reservation(rid) is None:
                event = BudgetReserved(
                    id=_new_id(),
                    at=now,
                    task_id=request.task_id,
                    reservation_id=rid,
                    provider=request.provider,
                    amount_usd=request.amount_usd,
                    expires_at=now + timedelta(seconds=request.ttl_s),
                    task_limit_usd=request.task_limit_usd,
                )
                await self._append(event)
                await self._announce_tier(event.id)
            return BudgetReserveReply(
                admitted=admission.admitted,
                reservation_id=rid,
                tier=self._tier_now(self.clock()),
                reason=admission.reason,
            )

    async def release(self, request: BudgetRelease, ctx: RequestContext) -> BudgetStatus:
        """Give back an open reservation; unknown or already closed ids change nothing."""
        if request.reason not in _RELEASE_REASONS:
            raise InvalidRequest(
                f"`reason` must be one of {', '.join(sorted(_RELEASE_REASONS))};"
                f" got {_shown(request.reason)}"
            )
        _check_id("reservation_id", request.reservation_id)
        if request.reason != "not_called" and self.state.reservation(request.reservation_id):
            await self._read_to_end()  # a failed call's spend first (no call, no spend)
        async with self._lock:
            await self._writable()
            await self._release(request.reservation_id, request.reason)
        return budget.status(self.state, self.limits, self.clock())

    async def lease(self, request: BudgetLeaseRequest, ctx: RequestContext) -> BudgetLeaseReply:
        """Grant or extend a lease; a grant is appended before it is answered."""
        lid = request.lease_id
        _check_id("lease_id", lid)
        _check_id("holder", request.holder)
        async with self._lock:
            await self._writable()
            now = self.clock()
            if self._tier_now(now) is Tier.EXCEEDED:
                size, why = budget.ZERO, "the budget tier is Exceeded: nothing is leased"
            else:
                size, why = budget.lease_size(self.state, self.limits, request, now, self.lease_usd)
            held = self.state.lease(lid)
            if size == 0:
                return self._lease_reply(lid, False, why)
            event = BudgetLeased(
                id=_new_id(),
                at=now,
                lease_id=lid,
                holder=request.holder,
                granted_usd=(held.granted_usd if held else budget.ZERO) + size,
                expires_at=now + timedelta(seconds=request.ttl_s),
                version=(held.version if held else 0) + 1,
            )
            await self._append(event)
            await self._announce_tier(event.id)
            return self._lease_reply(lid, True, why)

    async def lease_return(
        self, request: BudgetLeaseReturn, ctx: RequestContext
    ) -> BudgetLeaseReply:
        """Take back what a lease's holder no longer needs; unknown or closed leases: no-op.
        A returned lease that still keeps something (attempts were in flight) is returned again
        when its holder keeps less (they ended costing less than their bounds)."""
        _check_id("lease_id", request.lease_id)

        def returnable() -> bool:
            held = self.state.lease(request.lease_id)
            return (
                held is not None
                and held.holder == request.holder
                and (not held.returned or request.kept_usd < held.granted_usd)
            )

        if returnable():
            await self._read_to_end()  # its spends first (see _read_to_end)
        async with self._lock:
            await self._writable()
            if returnable():  # still, with them folded
                await self._return_lease(request.lease_id, request.kept_usd, request.reason)
            return self._lease_reply(request.lease_id, False, "returned")

    def _lease_reply(self, lid: str, granted: bool, reason: str) -> BudgetLeaseReply:
        held = self.state.lease(lid)
        return BudgetLeaseReply(
            granted=granted,
            lease_id=lid,
            granted_usd=held.granted_usd if held else budget.ZERO,
            expires_at=held.expires_at if held else None,
            tier=self._tier_now(self.clock()),
            reason=reason,
        )

    async def caps(self, request: BudgetCapsRequest, ctx: RequestContext) -> BudgetCaps:
        """A page of the task caps this keeper enforces: as many as fit in a reply, the state's
        shards one after the other, each in task id order; the cursor names where the next
        page starts (and this keeper's run: another run's shards are not these). The first page
        is answered once the keeper has read the log to its end: every cap the asking router's
        start did not read is in the pages, or in the events it follows from there."""
        if request.cursor:
            shard, after = self._caps_cursor(request.cursor)
        else:
            await self._read_to_end()
            shard, after = 0, ""
        room = min(reply_room(self.runtime.nc), MAX_MESSAGE_BYTES) - _CAPS_MARGIN
        used, caps = 0, list[TaskCap]()
        state = self.state  # (no await below: one state for the page)
        while shard < budget.SHARDS:
            for task_id, task in state.capped_tasks(shard, after):
                assert task.cap_usd is not None  # (capped_tasks: only those)
                cap = TaskCap(task_id=task_id, cap_usd=task.cap_usd, last_at=task.last_at)
                used += len(encode(cap)) + 1
                if used > room and caps:
                    # The next page starts after the last one of *this* shard taken ("": the
                    # shard from its start; the last cap taken may be of the shard before).
                    return BudgetCaps(caps=caps, cursor=f"{self._run}:{shard}:{after}")
                caps.append(cap)
                after = task_id
            shard, after = shard + 1, ""
        return BudgetCaps(caps=caps)

    def _caps_cursor(self, cursor: str) -> tuple[int, str]:
        run, _, rest = cursor.partition(":")
        shard, _, after = rest.partition(":")
        if not (rest and shard.isdigit() and int(shard) < budget.SHARDS):
            raise InvalidRequest(f"`cursor` {_shown(cursor)} is not one a page of caps gave")
        if run != self._run:
            raise ConcurrencyConflict(
                "`cursor` is of another budget keeper run (it restarted, or another answered): "
                "read the caps again from the first page"
            )
        return int(shard), after

    async def status(self, request: BudgetStatusRequest, ctx: RequestContext) -> BudgetStatus:
        """The limits, spend, holds, percentages and tier now."""
        return budget.status(self.state, self.limits, self.clock())

    # --- writing (always under the lock) ----------------------------------------------------

    async def _release(self, rid: str, reason: str) -> None:
        held = self.state.reservation(rid)
        if held is None:
            return
        event = BudgetReleased(
            id=_new_id(),
            at=self.clock(),
            task_id=held.task_id,
            reservation_id=rid,
            reason=reason,  # type: ignore[arg-type]  # checked against the Literal above
        )
        await self._append(event)
        await self._announce_tier(event.id)

    async def _return_lease(self, lid: str, kept: Decimal, reason: str) -> None:
        held = self.state.lease(lid)
        if held is None:
            return
        event = BudgetLeaseReturned(
            id=_new_id(),
            at=self.clock(),
            lease_id=lid,
            holder=held.holder,
            kept_usd=min(kept, held.granted_usd),
            reason=reason,  # type: ignore[arg-type]  # the contract's Literal
            version=held.version + 1,
        )
        await self._append(event)
        await self._announce_tier(event.id)

    async def _append(self, event: Event) -> None:
        """Append fenced, then fold the event in (see the module docstring)."""
        self._remember(event.id)
        sent = self._steady_now()
        # Shielded: a reply timeout must not leave an acknowledged event unfolded.
        with anyio.CancelScope(shield=True):
            try:
                appended = await self.log.append(
                    event, subject=self.subject, expected_last_subject_seq=self.fence
                )
            except ConcurrencyConflict as conflict:
                self._needs_resync = True
                await self._resync()
                if self.fenced_out is not None:
                    raise self._stopped_writing() from conflict
                raise
            except BaseException:
                self._needs_resync = True  # it may have landed: look before the next write
                self._quiet_since = self._steady_now()  # held spend may follow: expiry_grace
                raise
            self.fence = max(self.fence, appended.seq)
            at = getattr(event, "at", None)
            quick = self._steady_now() - sent < _SKEW_SAMPLE_S  # not stored long after its time
            if quick and not appended.duplicate and isinstance(at, datetime):
                self._written = (appended.seq, at)
            if isinstance(event, (*_MONEY_EVENTS, BudgetTierChanged)):
                self._fold_in(event)  # a tier change: now the tier announced
            self._changed += 1

    async def _writable(self) -> None:
        if self._needs_resync and self.fenced_out is None:
            await self._resync()
        if self.fenced_out is not None:
            raise self._stopped_writing()

    async def _read_to_end(self) -> None:
        """Wait until the tail has folded everything the log holds now: before a hold is given
        back. A failed call's spend is appended before its failure is answered, so it is in the
        log before the release the answer leads to; folded after the release, it would leave
        that money neither held nor spent meanwhile, and a reservation admitted then could pass
        the limits (a review: $1.20 spent of a $1.00 day, the tail 50 ms behind). Waited for
        before the lock is taken, so that the give-backs wait side by side and no reservation
        waits behind them (under the lock, each waited for the one before's own append: 20
        give-backs a second with the tail 50 ms behind). Not read in time
        (:data:`_READ_TO_END_S`, within the router's 2 s): 503, the hold kept (the router
        sends it again)."""
        await self._read_to(
            self.log.last_sequence,
            _READ_TO_END_S,
            "the budget keeper has not yet read the event log to its end; try again",
        )
        if self.fenced_out is not None:
            raise self._stopped_writing()

    async def _read_to(
        self, last_of: Callable[[], Awaitable[int]], within: float, late: str
    ) -> int:
        """Wait until the tail has folded the log up to ``await last_of()`` (or the keeper is
        fenced out); that sequence. Not within ``within`` seconds: a 503 saying ``late``."""
        try:
            with anyio.fail_after(within):
                last = await last_of()
                await self._until(
                    lambda: self.state.last_sequence >= last or self.fenced_out is not None
                )
        except TimeoutError:
            raise NoProviderAvailable(late) from None
        return last

    def _stopped_writing(self) -> ConcurrencyConflict:
        return ConcurrencyConflict(f"this budget keeper stopped writing: {self.fenced_out}")

    async def _resync(self) -> None:
        """Catch up with everything on the budget subject; fenced out if any of it is not ours."""
        last = await self._read_to(
            self._last_on_subject,
            self.resync_timeout_s,
            "the budget keeper cannot confirm its position in the event log; try again",
        )
        if self.fenced_out is None:
            self.fence = max(self.fence, last)
            self._needs_resync = False

    async def _last_on_subject(self) -> int:
        try:
            message = await self.log.js.get_last_msg(self.log.settings.name, self.subject)
        except NotFoundError:
            return 0
        return int(message.seq or 0)

    def _tier_now(self, now: datetime) -> Tier:
        """The tier routing should use: rises at once, falls with a margin (no flapping)."""
        return budget.settle_tier(self.announced, self.state, self.limits, now)

    async def _announce_tier(self, cause: str | None) -> None:
        """Append ``budget_tier_changed`` if the tier now differs from the last one announced.
        Caused by an event read from the log (a spend that settled), it is announced in that
        event's trace (a ``process`` span of the keeper's under the event's creation context)
        and its log line names the event's task."""
        if not self._ready or self.fenced_out is not None:
            return
        entry, self._tier_cause_entry = self._tier_cause_entry, None
        if entry is not None and entry[0] == cause:
            _, subject, headers, task_id = entry
            token = TASK_ID.set(task_id)
            try:
                if tracing.enabled():
                    with tracing.process_span(subject, headers, group="budget", msg_id=cause):
                        await self._announce_tier_now(cause)
                else:
                    await self._announce_tier_now(cause)
            finally:
                TASK_ID.reset(token)
            return
        await self._announce_tier_now(cause)

    async def _announce_tier_now(self, cause: str | None) -> None:
        now = self.clock()
        current = self._tier_now(now)
        self._tier_cause = None
        if current == self.announced:
            return
        daily, monthly = budget.percentages(self.state, self.limits, now)
        log.info("budget tier %s -> %s (caused by %s)", self.announced, current, cause)
        await self._append(
            BudgetTierChanged(
                id=_new_id(),
                at=now,
                causation_id=cause,
                from_tier=self.announced,
                to_tier=current,
                daily_percent=float(daily),
                monthly_percent=float(monthly),
            )
        )

    def _remember(self, event_id: str) -> None:
        self._own[event_id] = None
        while len(self._own) > _OWN_IDS_KEPT:
            self._own.popitem(last=False)

    def _fence_out(self, why: str) -> None:
        if self.fenced_out is None:
            self.fenced_out = why
            log.error(
                "budget keeper FENCED OUT: %s. Two budget keepers are running on one event log; "
                "this one stops writing and leaves the writing endpoints' queue group to the "
                "other (status still answers) until it is restarted alone.",
                why,
            )
            self._wake.set()  # the housekeeping withdraws the writing endpoints

    async def _withdraw_if_fenced(self) -> None:
        """A fenced-out keeper answered its share of reservations and leases 409 (skipped
        attempts); it leaves their queue group to the keeper that writes."""
        if self.fenced_out is not None and not self._withdrawn and self._service is not None:
            self._withdrawn = True
            await self._service.withdraw(list(_WRITING_ENDPOINTS))

    # --- housekeeping -----------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            with anyio.move_on_after(self.tick_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self._withdraw_if_fenced()
            try:
                expire = True
                if self.fenced_out is None and self._holds_due():
                    # A hold's spend may be in the log, not yet folded: freed before it, its
                    # money would be neither held nor spent meanwhile.
                    try:
                        await self._read_to_end()
                    except VaporaError as exc:
                        expire = False
                        log.info("budget keeper: no hold expired this time: %s", exc)
                async with self._lock:
                    await self._tick(expire=expire)
                await self._compare_clocks()
            except VaporaError as exc:
                log.warning("budget keeper: housekeeping deferred: %s", exc)
            except Exception:
                log.exception("budget keeper: housekeeping failed")

    async def _compare_clocks(self) -> None:
        """Compare this keeper's clock with the NATS server's, once a minute at most: the time
        it stamped on the last event it wrote against the time the server stored it at. The
        day and month a reservation or a lease is admitted against are by the keeper's clock,
        and a spend counts in the day its own time names: a keeper a day ahead admitted against
        an empty day while the day's spend went on (nothing compared its clock with any other).
        Said at ERROR, every ten minutes while it lasts (``clock_skew``: keeper minus server);
        a skew is not corrected (which clock is wrong is not known here)."""
        written = self._written
        if not self._check_clock or written is None or written[0] == self._compared:
            return
        now = self._steady_now()
        if self._compared_at is not None and now - self._compared_at < _SKEW_CHECK_S:
            return
        self._compared_at = now
        seq, at = written
        self._compared = seq
        stored = None
        try:
            # Bounded: the housekeeping that expires holds waits for it.
            with anyio.move_on_after(_SKEW_ASK_S):
                stored = await self.log.stored(seq)
        except Exception as exc:  # no server to ask now: the next minute's event is compared
            log.debug("budget keeper: its clock was not compared: %s", exc)
            return
        server_at = getattr(stored, "time", None)
        if not isinstance(server_at, datetime):
            return  # aged out of the stream, or a server that says no time
        skew = budget.as_utc(at) - budget.as_utc(server_at)
        was, self.clock_skew = self.clock_skew, skew
        if abs(skew) <= _SKEWED:
            if was is not None and abs(was) > _SKEWED:
                log.info("budget keeper: its clock agrees with the NATS server's again")
            return
        if self._skew_said is not None and now - self._skew_said < _SKEW_EVERY_S:
            return
        self._skew_said = now
        log.error(
            "budget keeper: its clock is %s s %s the NATS server's (event %d stamped %s, stored "
            "at %s by the server): it admits reservations and leases against the day and month "
            "its clock names, while spend counts in the day its writer's clock names; set the "
            "clocks right (NTP) on this host or the server's",
            f"{abs(skew.total_seconds()):,.0f}",
            "ahead of" if skew > timedelta(0) else "behind",
            seq,
            budget.as_utc(at).isoformat(),
            budget.as_utc(server_at).isoformat(),
        )

    def _note_spend(self) -> None:
        status = budget.status(self.state, self.limits, self.clock())
        self._spent_now = (("day", status.spent_today_usd), ("month", status.spent_month_usd))

    def _spent(self) -> tuple[tuple[str, Decimal], ...]:
        return self._spent_now

    def _holds_due(self) -> bool:
        """Whether a hold that no provider actor says is pending is past its expiry."""
        now, pending = self._expiry_now(), self._pending
        due = [*budget.expired(self.state, now), *budget.expired_leases(self.state, now)]
        return any(hold not in pending for hold in due)

    def _steady_now(self) -> float:
        """Steady seconds (the wall clock's, as seconds, with a clock moved by hand)."""
        return self._steady() if self._steady is not None else self.clock().timestamp()

    def _expiry_now(self) -> datetime:
        """The time holds expire by: the wall clock, but no later than the start's wall time
        plus the steady seconds since (a wall clock stepped forward by five minutes expired a
        $9 hold whose call still ran, and a second $9 was admitted under a $10 day, in a
        review). A wall clock stepped back delays expiry, which only holds money longer."""
        now = self.clock()
        if self._steady is None:
            return now
        steady = self._steady()
        if self._steady_base is None:
            self._steady_base = (now, steady)
        wall, base = self._steady_base
        projected = wall + timedelta(seconds=steady - base)
        if now <= projected:
            self._ahead_since = None
            return now
        # The wall clock ahead of the steady one: a step forward, or a clock set right that was
        # behind at the start. Taken as it is once every hold that could have been in flight at
        # the step has ended (the longest a hold lives, an hour: then none expires early).
        gap = (now - projected).total_seconds()
        if self._ahead_since is None or gap > self._ahead_gap + 1:
            # (a step, or a further one: the hour counts from the last; a second step within
            # the hour was trusted with the first, and expired holds it had just moved past)
            self._ahead_since, self._ahead_gap = steady, gap
        elif steady - self._ahead_since >= _STEP_TRUSTED_S:
            self._steady_base, self._ahead_since = (now, steady), None
            return now
        return projected

    async def _tick(self, *, expire: bool = True) -> None:
        self._note_spend()
        if self.fenced_out is None:
            await self._writable()
            now = self._expiry_now()
            self._pending = {rid: until for rid, until in self._pending.items() if until > now}
            quiet = (  # (in steady seconds: a wall clock stepped back does not stretch it)
                self._quiet_since is None
                or self._steady_now() - self._quiet_since >= self.expiry_grace.total_seconds()
            )
            if expire and quiet:
                for rid in budget.expired(self.state, now):
                    if rid not in self._pending:  # spent, only not in the log yet
                        await self._release(rid, "expired")
                for lid in budget.expired_leases(self.state, now):
                    if lid not in self._pending:
                        held = self.state.lease(lid)
                        kept = held.spent_usd if held else budget.ZERO
                        await self._return_lease(lid, kept, "expired")
            await self._announce_tier(self._tier_cause)
        if self._snapshot_due():
            await self._write_snapshot()

    async def _on_pending(self, message: Any) -> None:
        """``vapora.budget.pending``: holds whose spend a provider actor keeps on disk until
        the log takes it; none of them expires for :data:`_PENDING_S` after each word."""
        try:
            pending = decode(message.data, BudgetPending)
        except DecodeError as exc:
            log.warning("budget keeper: a pending notice that is not one: %s", exc)
            return
        until = self.clock() + timedelta(seconds=_PENDING_S)
        for hold in pending.holds:
            self._pending.pop(hold, None)  # said again: the most recent, last to be forgotten
            self._pending[hold] = until
        while len(self._pending) > _PENDING_REMEMBERED:
            del self._pending[next(iter(self._pending))]

    def _quiescent(self) -> bool:
        """Every budget event we know of is folded with its sequence: the state is exactly the
        fold of the log up to ``last_sequence`` (a snapshot of it needs no idempotence)."""
        return self.fence <= self.state.last_sequence

    def _snapshot_due(self) -> bool:
        if not self._quiescent():
            return False
        if self._changed >= self.snapshot_every:
            return True
        return bool(self._changed) and (
            time.monotonic() - self._snapshot_time >= self.snapshot_interval_s
        )

    async def _write_snapshot(self) -> None:
        """Write the state atomically (temporary file, fsync, rename) off the event loop."""
        if self.fenced_out is not None or not self._ready:
            return
        saved = _SnapshotFile(
            version=_SNAPSHOT_VERSION,
            stream=self.log.settings.name,
            fence=self.fence,
            announced=self.announced,
            state=b"",
            stream_created=self._stream_created,
            passed_by=list(self._passed_by),
        )
        state, path = self._fold.state(), self.snapshot_path  # frozen: read off the loop
        self._changed, self._snapshot_time = 0, time.monotonic()
        await anyio.to_thread.run_sync(_write_atomically, path, saved, state)


async def _serve(
    service: ActorService, served: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    try:
        await service.run(task_status=task_status)
    finally:
        served.set()


def _write_atomically(path: Path, saved: _SnapshotFile, state: BudgetState) -> None:
    saved.state = budget.snapshot(state)  # the state is frozen: safe to read off the loop
    data = _snapshot_encoder.encode(saved)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _usable(amount: Decimal) -> bool:
    """An amount a sum can take (what the whole decoder checks: finite, 0 to MAX_AMOUNT)."""
    try:
        check_amount("amount", amount)
    except ValueError:
        return False
    return True


def _last_money_event(events: list[View]) -> str | None:
    for event in reversed(events):
        if isinstance(event, _MONEY_VIEWS):
            return event.id
    return None


def _shown(value: str, limit: int = 60) -> str:
    """``value`` quoted for an error message, cut short (a 100 KB value was repeated whole in
    the reply and in ``$SRV.STATS``)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


def _check_id(name: str, value: str) -> None:
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidRequest(f"`{name}` must be 1 to {MAX_ID_LENGTH} characters")


def _new_id() -> str:
    return uuid.uuid4().hex
