"""The cost ledger actor: the whole event log into SQLite, and ``vapora.report`` (DESIGN §2, §3).

It resumes after :meth:`vapora.ledger.Ledger.last_sequence` and applies each batch of the log with
:meth:`~vapora.ledger.Ledger.apply_many`, which stores the batch's rows and the last sequence in one
transaction: a crash at any point neither loses nor double-counts an event. Start-up replays the
log up to its end before the actor reports ready; afterwards a :class:`~actors.follow.LogFollower`
tails it, surviving server restarts. ``vapora.report`` (:class:`ReportRequest` ->
:class:`CostReport`) is answered from the database with ``now`` from the runtime clock, through a
read-only connection of its own: a report sees the last committed batch and holds up no apply.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from actors import tracing
from actors.eventlog import LogEntry
from actors.follow import LogFollower
from actors.runner import Runtime
from actors.service import ActorService, Endpoint, RequestContext
from events import subjects
from events.codec import DecodeError, decode_event
from events.contract import CostReport, ReportRequest
from events.log import Event
from vapora.errors import ConfigError, InvalidRequest
from vapora.ledger import Ledger

__all__ = ["LEDGER_FILE", "CostLedger"]

log = logging.getLogger("vapora.ledger")

# The live tail commits what arrived in this long as one transaction (see LogFollower): the
# ledger is read by reports and audits, never waited on by a request, and a commit (fsync'd,
# `synchronous=FULL`) per event or two cost ~100 µs of CPU each (thread hand-offs, SQLite,
# fsync) in the process that also routes.
_LINGER_S = 0.02

LEDGER_FILE = "ledger.sqlite3"


class CostLedger:
    """The cost ledger actor (``vapora actor ledger``)."""

    name = "ledger"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.log = runtime.log
        self.path = Path(runtime.data_dir) / LEDGER_FILE
        self.position = 0  # the last sequence applied (and committed)
        self.replayed_events = 0
        self._ledger: Ledger | None = None
        # Reports read through a connection of their own (SQLite's WAL: a reader sees the last
        # commit and never waits for the writer), so a long report never holds up applying.
        self._reader: Ledger | None = None
        # A stopping ledger lets a batch being written commit before it is cancelled.
        self._lock = anyio.Lock()
        self._stopping = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the database, catch up with the log, serve reports until :meth:`stop`."""
        started = time.monotonic()
        await self.log.ensure_stream()
        await anyio.Path(self.path.parent).mkdir(parents=True, exist_ok=True)
        async with (
            await Ledger.open(self.path) as ledger,
            await Ledger.open_read_only(self.path) as reader,
        ):
            self._ledger, self._reader = ledger, reader
            self.position = await ledger.last_sequence()
            if await self._check_same_stream(ledger):
                await self._read_again(ledger)
            wildcard = self.log.settings.wildcard
            async for batch in self.log.replay(self.position + 1):
                # A replay links to the events' traces, never adds spans under them.
                with tracing.processed(batch, group="ledger", replay=True, destination=wildcard):
                    await self._apply(batch)
                self.replayed_events += len(batch)
            follower = LogFollower(
                self.log,
                name="cost ledger",
                apply=self._apply,
                position=lambda: self.position,
                trace_group="ledger",  # the live tail continues each event's trace
                linger_s=_LINGER_S,
            )
            service = self._make_service()
            served = anyio.Event()
            async with anyio.create_task_group() as tg:
                await tg.start(follower.run)
                await tg.start(_serve, service, served)
                log.info(
                    "cost ledger ready in %.3f s at sequence %d (%d events replayed) in %s",
                    time.monotonic() - started,
                    self.position,
                    self.replayed_events,
                    self.path,
                )
                task_status.started()
                await self._stopping.wait()
                await self._catch_up_to_end()
                service.stop()
                # Never cancel the service mid-drain: nats-py's read loop dies if a flush it
                # is waiting on is cancelled and its PONG arrives afterwards.
                with anyio.move_on_after(15):
                    await served.wait()
                async with self._lock:  # let a batch being written commit
                    tg.cancel_scope.cancel()

    async def _catch_up_to_end(self) -> None:
        """Before stopping, apply what the log holds now (a deployment stops its writers first:
        their last events, such as the provider actors' word that they stop, would otherwise
        wait for the ledger's next start, and an offline audit meanwhile finds them missing).
        Bounded: a log that cannot be read stops the ledger where it is."""
        with anyio.move_on_after(_STOP_CATCH_UP_S):
            try:
                end = await self.log.last_sequence()
            except Exception:  # the server gone: nothing more to read
                return
            while self.position < end:  # noqa: ASYNC110 - the follower moves it: polled
                await anyio.sleep(0.02)

    async def _read_again(self, ledger: Ledger) -> None:
        """Record the events an earlier version of the ledger passed by as messages that were
        no event (a newer writer's: a field or a type it did not know), now that they read: an
        upgraded ledger never stored their spend, and when the last thing recorded was one, it
        refused to start ("built from another event stream") though the stream was its own."""
        found: list[tuple[Event, int]] = []
        for seq in await ledger.unreadable_sequences():
            stored = await self._stored(seq)
            if stored is None or stored is _AGED:
                continue
            try:
                found.append((decode_event(stored.data), seq))
            except DecodeError:
                continue  # (still no event this version reads)
        recorded = await ledger.replace_unreadable(found) if found else 0
        if recorded:
            log.warning(
                "cost ledger: %d events an earlier version recorded as unreadable read now; "
                "recorded",
                recorded,
            )

    async def _check_same_stream(self, ledger: Ledger) -> bool:
        """The ledger resumes after its last sequence: that must be the stream it was built
        from. A stream made again, or a data directory pointed at another server, would have
        the ledger skip the new stream's first events (or take them for others). Checked on
        the last event recorded: the stream must hold the same event id at that sequence. With
        no event recorded, only messages that were none, the stream must not hold an event at
        the last one's sequence (nothing else tells the stream apart). True when an event
        recorded was found where it was: the stream is the ledger's own, and a message it
        recorded as no event that reads now is a newer writer's event (:meth:`_read_again`)."""
        last = await ledger.last_event()
        if last is None:
            last_row = await ledger.last_row()
            if last_row is not None and last_row[1] == f"unreadable-{last_row[0]}":
                stored = await self._stored(last_row[0])
                if stored is not None and stored is not _AGED and _is_event(stored.data):
                    held = (stored.headers or {}).get("Nats-Msg-Id")
                    recorded = f"a message that was no event at sequence {last_row[0]}"
                    raise self._other_stream(recorded, f"event {held}")
            return False
        seq, event_id = last
        stored = await self._stored(seq)
        if stored is _AGED:
            return False  # aged out of a stream with limits: nothing to compare
        stored_id = _stored_id(stored) if stored is not None else None
        if stored_id != event_id:
            found = f"event {stored_id}" if stored_id else "no event"
            raise self._other_stream(f"event {event_id} at sequence {seq}", found)
        return True

    async def _stored(self, seq: int) -> Any:
        """The stream's message at ``seq``; None if it has none; :data:`_AGED` if it aged out."""
        stored = await self.log.stored(seq)
        if stored is None and await self.log.first_sequence() > seq:
            return _AGED
        return stored

    def _other_stream(self, recorded: str, found: str) -> ConfigError:
        return ConfigError(
            f"{self.path} was built from another event stream: it recorded {recorded}, where "
            f"stream {self.log.settings.name} holds {found}. Move the file aside and the ledger "
            "is rebuilt from the log"
        )

    def stop(self) -> None:
        """Stop serving and tailing; the database is closed when :meth:`run` returns."""
        self._stopping.set()

    def _make_service(self) -> ActorService:
        return ActorService(
            self.runtime.nc,
            name="vapora-ledger",
            reserved_replies=(self.runtime.log.settings.prefix + ".",),
            description="cost ledger: reports over every spend_recorded",
            endpoints=[
                Endpoint(
                    name="report",
                    subject=subjects.REPORT,
                    request_type=ReportRequest,
                    handler=self.report,
                    queue_group="ledger",
                    timeout=30.0,
                )
            ],
        )

    async def _apply(self, batch: list[LogEntry[Event]]) -> None:
        assert self._ledger is not None
        async with self._lock:
            await self._ledger.apply_many([(entry.event, entry.seq) for entry in batch])
            self.position = await self._ledger.last_sequence()

    async def report(self, request: ReportRequest, ctx: RequestContext) -> CostReport:
        """The cost report of spend in ``[since, until)``."""
        since, until = request.since, request.until
        if since is not None and until is not None and _aware(since) > _aware(until):
            raise InvalidRequest("`since` must not be after `until`")
        assert self._reader is not None
        return await self._reader.report(since, until, now=self.runtime.clock())


async def _serve(
    service: ActorService, served: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    try:
        await service.run(task_status=task_status)
    finally:
        served.set()


def _aware(at: datetime) -> datetime:
    """A naive timestamp is UTC (the contract's times are UTC)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


#: How long a stopping ledger waits to apply what the log holds (seconds).
_STOP_CATCH_UP_S = 5.0

#: The stream no longer holds the sequence asked for (limits retention aged it out).
_AGED: Any = object()


def _stored_id(stored: Any) -> str | None:
    """The event id of a stored message: its ``Nats-Msg-Id``, or for one stored without it (a
    writer outside vapora: the ledger refused to start again after recording it, a review) the
    ``id`` in its body."""
    held: str | None = (stored.headers or {}).get("Nats-Msg-Id")
    if held is not None:
        return held
    try:
        return decode_event(stored.data).id
    except DecodeError:
        return None


def _is_event(data: bytes) -> bool:
    try:
        decode_event(data)
    except DecodeError:
        return False
    return True
