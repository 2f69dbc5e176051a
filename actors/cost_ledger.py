"""The cost ledger actor: the whole event log into SQLite, and ``vapora.report`` (DESIGN §2, §3).

It resumes after :meth:`vapora.ledger.Ledger.last_sequence` and applies each batch of the log with
:meth:`~vapora.ledger.Ledger.apply_many`, which stores the batch's rows and the last sequence in one
transaction: a crash at any point neither loses nor double-counts an event. Start-up replays the
log up to its end before the actor reports ready; afterwards a :class:`~actors.follow.LogFollower`
tails it, surviving server restarts. ``vapora.report`` (:class:`ReportRequest` ->
:class:`CostReport`) is answered from the database with ``now`` from the runtime clock.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
from nats.js.errors import NotFoundError

from actors import tracing
from actors.eventlog import LogEntry
from actors.follow import LogFollower
from actors.runner import Runtime
from actors.service import ActorService, Endpoint, RequestContext
from events import subjects
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
        # Reports wait while a batch is being written: they read the same connection, and must
        # not see half a transaction.
        self._lock = anyio.Lock()
        self._stopping = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the database, catch up with the log, serve reports until :meth:`stop`."""
        started = time.monotonic()
        await self.log.ensure_stream()
        await anyio.Path(self.path.parent).mkdir(parents=True, exist_ok=True)
        async with await Ledger.open(self.path) as ledger:
            self._ledger = ledger
            self.position = await ledger.last_sequence()
            await self._check_same_stream(ledger)
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
                service.stop()
                # Never cancel the service mid-drain: nats-py's read loop dies if a flush it
                # is waiting on is cancelled and its PONG arrives afterwards.
                with anyio.move_on_after(15):
                    await served.wait()
                async with self._lock:  # let a batch being written commit
                    tg.cancel_scope.cancel()

    async def _check_same_stream(self, ledger: Ledger) -> None:
        """The ledger resumes after its last sequence: that must be the stream it was built
        from. A stream made again, or a data directory pointed at another server, would have
        the ledger skip the new stream's first events (or take them for others). Checked on
        the last event recorded: the stream must hold the same event id at that sequence."""
        last = await ledger.last_event()
        if last is None:
            return
        seq, event_id = last
        name = self.log.settings.name
        try:
            stored = await self.log.js.get_msg(name, seq)
        except NotFoundError:
            info = await self.log.js.stream_info(name)
            if int(info.state.first_seq) > seq:
                return  # aged out of a stream with limits: nothing to compare
            stored_id = None
        else:
            stored_id = (stored.headers or {}).get("Nats-Msg-Id")
        if stored_id != event_id:
            found = f"event {stored_id}" if stored_id else "no event"
            raise ConfigError(
                f"{self.path} was built from another event stream: it recorded event {event_id} "
                f"at sequence {seq}, where stream {name} holds {found}. Move the file aside and "
                "the ledger is rebuilt from the log"
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
        assert self._ledger is not None
        async with self._lock:
            return await self._ledger.report(since, until, now=self.runtime.clock())


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
