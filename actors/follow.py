"""Following the event log for a projection, through lost consumers and server restarts.

``EventLog.tail`` reads through an ephemeral pull consumer. If the nats-server restarts, that
consumer (and the pull request waiting on it) is gone, and the tail would wait forever. A
:class:`LogFollower` watches its tail: when the client reconnected, or when the stream has moved
past the projection's position and no batch arrived for ``stall_s`` seconds, it abandons the
tail and opens a new one from ``position() + 1``. The projection keeps its own position (in its
own transaction or state), so a restart of the tail neither loses nor repeats an event.

With ``filter_subject`` (the router's views: health, budget, spend), the tail reads only the
events on those subjects, and "the stream has moved past" means an event on them after
``position()`` (the last one applied): other events moving the stream on are no stall.

With ``trace_group`` (the cost ledger's), each event's processing is a ``process <subject>``
span parented by the context the event was appended with (:func:`actors.tracing.processed`).

Each batch is applied shielded from the watchdog's cancellation: a batch is applied whole or,
if the projection fails, not at all, never cut in the middle by a tail restart.

With ``linger_s``, the follower waits that long after applying a batch before taking the next,
so a projection that pays per batch (the ledger's SQLite transaction) applies what arrived
meanwhile in one: under load, one transaction per ``linger_s`` instead of one per event or two.
Not for a projection its writer waits on (the budget keeper reads its own appends back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from actors import tracing
from actors.eventlog import EventLog, LogEntry
from events.log import Event

__all__ = ["LogFollower"]

log = logging.getLogger("vapora.follow")

ApplyBatch = Callable[[list[LogEntry[Event]]], Awaitable[None]]


class LogFollower:
    """Feed every event after ``position()`` to ``apply``, in order, until cancelled."""

    def __init__(
        self,
        event_log: EventLog,
        *,
        name: str,
        apply: ApplyBatch,
        position: Callable[[], int],
        stall_s: float = 2.0,
        check_s: float = 0.5,
        retry_s: float = 0.5,
        trace_group: str | None = None,
        linger_s: float = 0.0,
        filter_subject: str | None = None,
    ) -> None:
        self.log = event_log
        self.filter_subject = filter_subject
        self.linger_s = linger_s
        self.name = name
        self.trace_group = trace_group
        self.apply = apply
        self.position = position
        self.stall_s = stall_s
        self.check_s = check_s
        self.retry_s = retry_s
        self.restarts = 0
        self._scope: anyio.CancelScope | None = None
        self._progress = time.monotonic()
        self._reconnects = 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the log forever; ``task_status.started()`` once the first tail is opening."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            task_status.started()
            while True:
                await self._follow_once()
                self.restarts += 1

    async def _follow_once(self) -> None:
        self._reconnects = self._reconnect_count()
        self._progress = time.monotonic()
        start = self.position() + 1
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                async for batch in self.log.tail(start, filter_subject=self.filter_subject):
                    with anyio.CancelScope(shield=True):
                        await self._apply(batch)
                    self._progress = time.monotonic()
                    if self.linger_s:
                        await anyio.sleep(self.linger_s)  # the tail buffers what arrives
            except Exception as exc:  # the server is away, the consumer vanished, ...
                log.warning("%s: the log tail from %d failed: %s; retrying", self.name, start, exc)
                await anyio.sleep(self.retry_s)
        if scope.cancelled_caught:
            log.info("%s: reopening the log tail after sequence %d", self.name, self.position())

    async def _apply(self, batch: list[LogEntry[Event]]) -> None:
        if self.trace_group is None or not tracing.enabled():
            await self.apply(batch)
            return
        # The live tail: each event's processing continues the trace that appended it.
        wildcard = self.log.settings.wildcard
        with tracing.processed(batch, group=self.trace_group, replay=False, destination=wildcard):
            await self.apply(batch)

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(self.check_s)
            if self._scope is None or self._scope.cancel_called:
                continue
            if self._reconnect_count() != self._reconnects or await self._stalled():
                self._scope.cancel()

    async def _stalled(self) -> bool:
        """The stream is ahead of us and the tail has delivered nothing for ``stall_s``."""
        if time.monotonic() - self._progress < self.stall_s:
            return False
        self._progress = time.monotonic()  # ask the server at most once per stall period
        try:
            with anyio.fail_after(self.stall_s):
                if self.filter_subject is not None:
                    return await self.log.has_after(self.position(), self.filter_subject)
                return await self.log.last_sequence() > self.position()
        except Exception:  # the server is away: reopen once it is back
            return True

    def _reconnect_count(self) -> int:
        return int(self.log.nc.stats.get("reconnects", 0))
