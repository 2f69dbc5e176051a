"""The append-only event log on JetStream: create the stream, append (deduplicated, fenced,
pipelined), replay from any sequence at full speed, and tail it for projections.

* ``append`` sends the event id as ``Nats-Msg-Id``, so a retried append within the stream's
  duplicate window is stored once; an actor that is the single writer of a subject passes
  ``expected_last_subject_seq`` (``Nats-Expected-Last-Subject-Sequence``) and a second writer gets
  :class:`vapora.errors.ConcurrencyConflict` instead of corrupting state.
* ``append_many`` publishes every event before awaiting any acknowledgement (one reply inbox,
  one future per event), so a task's events cost one round trip, not one each.
* An append rides through a NATS node's loss (cluster mode): an event whose acknowledgement has
  not come within ``resend_after`` seconds, or that met no stream leader (a "no responders"
  status, a 503 from JetStream during a leader election, "duplicate message id is in
  process" while a new leader still proposes an earlier send, "too many requests"), is sent
  again with the same ``Nats-Msg-Id`` until it is acknowledged or ``ack_timeout`` has
  passed, so it is stored once. A publish the server refuses for lack of permission fails
  at once with :class:`actors.connection.PermissionDenied`.
* ``ensure_stream`` gives the stream ``settings.replicas`` replicas, or when that is None, 3 on
  a clustered server and 1 otherwise (:func:`actors.cluster.stream_replicas`).
* ``replay`` and ``tail`` read through an ordered push consumer whose callback only buffers raw
  messages; decoding happens in batches in the reader's task. nats-py's ``fetch()`` loop is several
  times slower (measured in ``bench/bench_runtime.py``).
* Projections keep their position themselves, in the same transaction as their update (the
  eventsourcing ``Tracking`` pattern), and resume with ``tail(last_applied + 1)``; that is
  stronger than a JetStream durable consumer's ack state, which is not transactional with SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from nats import errors as nats_errors
from nats.js import api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError
from opentelemetry.trace import Span

from actors import tracing
from actors.cluster import stream_replicas
from actors.connection import Client, ConnectionFailed, PermissionDenied
from actors.protocol import RawMessage
from events import subjects
from events.codec import DecodeError, decode_events, encode, event_tag
from events.log import Event
from vapora.config import redact_url
from vapora.errors import ConcurrencyConflict, InternalError

__all__ = [
    "Appended",
    "EventLog",
    "JetStreamUnavailable",
    "LogEntry",
    "NoEventStream",
    "stream_differences",
    "ReplayBatch",
    "StreamSettings",
]


class JetStreamUnavailable(ConnectionFailed):
    """No JetStream answers on the connected server: JetStream is off, or a cluster has no
    meta leader."""


class NoEventStream(ConnectionFailed):
    """The server has no event stream: no vapora actor has run against it."""


class _PeerOffline(Exception):
    """A stream's placement refused for a server of the cluster not heard from: asked again by
    ``ensure_stream``, and ``refusal`` raised when the attempts are used up."""

    def __init__(self, refusal: NoEventStream) -> None:
        super().__init__(refusal.args[0])
        self.refusal = refusal


log = logging.getLogger("vapora.eventlog")

# JSClusterNoPeersErrF: no server can take a replica (a peer offline, tags not matched, ...).
_NO_PEERS = 10005

# JetStream error codes for a failed expected-sequence check.
_WRONG_LAST_SEQUENCE = {10071, 10164}
# A status reply instead of an acknowledgement: no stream leader is listening (yet).
_NO_RESPONDERS = b"NATS/1.0 503"
# How long to wait before re-sending after a status reply or a retriable error (the first time;
# doubled each time after, up to 8 times it).
_RESEND_PAUSE_S = 0.25


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """The event stream's configuration (DESIGN §3: file storage, limits, no delete, no purge)."""

    name: str = subjects.EVENT_STREAM
    prefix: str = subjects.EVENTS_PREFIX
    # None: 3 when the connected server is clustered, else 1 (resolved by ensure_stream).
    replicas: int | None = None
    duplicate_window_s: float = 120.0
    max_age_s: float = 0.0
    max_bytes: int = -1

    @property
    def wildcard(self) -> str:
        return f"{self.prefix}.>"

    def subject_for(self, event: Event) -> str:
        """The subject ``event`` is appended to (see :func:`events.subjects.event_subject`)."""
        return subjects.event_subject(event_tag(event), _provider_of(event), self.prefix)

    def config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=[self.wildcard],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas or 1,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
        )


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class Appended(msgspec.Struct, frozen=True, gc=False):
    """Where an event landed; ``duplicate`` when the same event id was already stored."""

    seq: int
    duplicate: bool


E = TypeVar("E")


class LogEntry(msgspec.Struct, Generic[E], frozen=True, gc=False):
    """One stored event with its stream sequence; ``raw_headers`` as stored (parse on demand).

    ``event`` is the decoded event (``LogEntry[Event]``), or what a replay's own decoder made of
    it (:meth:`ReplayBatch.entries`). A Struct, not a dataclass: a replay makes one per event,
    and a frozen dataclass's ``__init__`` cost five times as much (0.84 against 0.17 µs)."""

    seq: int
    subject: str
    event: E
    raw_headers: bytes | None

    @property
    def headers(self) -> dict[str, str]:
        if not self.raw_headers:
            return {}
        return Client._parse_header_lines(self.raw_headers[self.raw_headers.find(b"\r\n") :])


class Unreadable(msgspec.Struct, frozen=True, kw_only=True, tag="unreadable"):
    """In a batch read from the log, in the place of a stored message that is not an event (a
    writer outside vapora, an older version's bug): it changes nothing a reader keeps, and the
    reader's position moves past it like past any event. Never appended; ``EventLog.unreadable``
    and ``vapora audit`` name it. ``at`` is when it was read (a stored message that is not an
    event has no time of its own that can be trusted)."""

    id: str
    subject: str
    problem: str
    at: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))


class ReplayBatch(Generic[E]):
    """A batch of a replay as read: the stream sequences, the messages and their decoded events,
    side by side, with no :class:`LogEntry` made per event until :meth:`entries` is called.

    For a bulk reader that folds every event and looks closer at few of them (the budget
    keeper's restart): making a ``LogEntry`` per event was about a twentieth of its replay.
    ``seqs`` increase (usually a ``range``); ``messages`` are ``(subject, reply, payload,
    headers)`` as received.
    """

    __slots__ = ("events", "messages", "seqs")

    def __init__(self, seqs: Sequence[int], messages: list[RawMessage], events: list[E]) -> None:
        self.seqs = seqs
        self.messages = messages
        self.events = events

    def __len__(self) -> int:
        return len(self.events)

    def entries(self) -> list[LogEntry[E]]:
        """The batch as log entries."""
        return [
            LogEntry(seq, subject.decode(), event, headers)
            for seq, (subject, _, _, headers), event in zip(
                self.seqs, self.messages, self.events, strict=True
            )
        ]


class EventLog:
    """The event log of one NATS connection."""

    def __init__(
        self,
        nc: Client,
        settings: StreamSettings | None = None,
        *,
        ack_timeout: float = 30.0,
        resend_after: float = 2.0,
        pull_timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.settings = settings or StreamSettings()
        self.ack_timeout = ack_timeout
        self.resend_after = resend_after
        # A replay's pull requests are answered at once; none answered for this long (lost
        # with a connection or a node), the replay goes on through a new consumer.
        self.pull_timeout = pull_timeout
        # Replays and tails that lost their consumer and went on with a new one.
        self.replay_resumes = 0
        #: Stored messages that are not events (sequence -> what was wrong), skipped by every
        #: read of this log: a writer outside vapora, or an older version's bug. Each is logged
        #: once; ``vapora audit`` reports them as differences.
        self.unreadable: dict[int, str] = {}
        self.js = nc.jetstream()
        self._inbox: str | None = None
        self._acks: dict[bytes, _Ack] = {}
        self._next = 0
        # Appends sent again because no acknowledgement came (e.g. during a leader election).
        self.resends = 0

    # --- stream ---------------------------------------------------------------------------

    async def ensure_stream(self, *, attempts: int = 4, strict: bool = False) -> api.StreamInfo:
        """Create the stream, or bring an existing one's settings up to date.

        A stream that already has these settings is left alone, so an actor whose NATS user may
        not update the stream (``vapora.deploy``'s permissions) starts against it; one whose
        settings differ (an admin's) is used as it is, with a warning naming the differences,
        unless ``strict`` (``vapora stream``: the update is the point), which raises.

        JetStream's API can leave a request unanswered, or answer 503, while a cluster is still
        electing its leaders (seen right after three servers formed one: the stream was created
        and the reply never came). Such a request is asked again, up to ``attempts`` times in
        all; creating a stream with the settings it already has is a no-op, so asking again is
        safe. Any other error is raised at once.
        """
        for attempt in range(1, attempts):
            try:
                return await self._ensure_stream(strict)
            except (nats_errors.TimeoutError, ServiceUnavailableError, _PeerOffline) as exc:
                log.warning(
                    "event log: JetStream did not settle stream %s (%s, attempt %d of %d); "
                    "asking again",
                    self.settings.name,
                    exc if isinstance(exc, _PeerOffline) else type(exc).__name__,
                    attempt,
                    attempts,
                )
                await anyio.sleep(0.25 * attempt)
        try:
            return await self._ensure_stream(strict)  # the last attempt: its error is the caller's
        except ServiceUnavailableError:
            raise self._unavailable(f"{attempts} attempts") from None
        except _PeerOffline as exc:
            raise exc.refusal from None

    async def existing_stream(self) -> api.StreamInfo:
        """The stream as it is, for a reader that must neither create nor change it (its
        replicas and limits are the deployment's, which a reader's config may not know)."""
        try:
            return await self.js.stream_info(self.settings.name)
        except NotFoundError:
            raise NoEventStream(
                f"no event stream {self.settings.name} on {self._server()}: no vapora actor has "
                "run against this server"
            ) from None
        except ServiceUnavailableError:
            raise self._unavailable("asked once") from None

    def _server(self) -> str:
        url = self.nc.connected_url
        return redact_url(url.geturl()) if url is not None else "the NATS server"

    def _unavailable(self, tried: str) -> JetStreamUnavailable:
        return JetStreamUnavailable(
            f"JetStream does not answer on {self._server()} (no responder for stream "
            f"{self.settings.name}, {tried}): run the server with JetStream on "
            "(nats-server -js, or a jetstream {} block); a cluster needs its meta leader"
        )

    async def _ensure_stream(self, strict: bool = False) -> api.StreamInfo:
        config = self.wanted_config()
        try:
            info = await self.js.stream_info(self.settings.name)
        except NotFoundError:
            return await self._settled(self.js.add_stream(config), config)
        if _settings_match(info.config, config):
            return info
        try:
            return await self._settled(self.js.update_stream(config), config)
        except PermissionDenied:
            if strict:
                raise
            # Settings are an admin's to change (docs/operations-cluster.md): an actor whose
            # user may not, and whose config differs from what the admin set (replicas, limits),
            # works with the stream as it is.
            log.warning(
                "event log: stream %s differs from this config's settings (%s) and this NATS "
                "user may not change it; using the stream as it is",
                self.settings.name,
                "; ".join(
                    f"{key} {there!r} there, {here!r} here"
                    for key, there, here in stream_differences(info.config, config)
                ),
            )
            return info

    def wanted_config(self) -> api.StreamConfig:
        """The stream's settings as this log makes them (``[storage] replicas`` resolved)."""
        config = self.settings.config()
        config.num_replicas = stream_replicas(self.nc, self.settings.replicas)
        return config

    async def _settled(
        self, request: Awaitable[api.StreamInfo], config: api.StreamConfig
    ) -> api.StreamInfo:
        """A stream made or updated; the server's refusal of its settings, named."""
        try:
            return await request
        except APIError as exc:
            if isinstance(exc, ServiceUnavailableError):  # asked again by ensure_stream
                raise
            refusal = NoEventStream(
                f"{self._server()} refused the event stream {self.settings.name} with "
                f"{config.num_replicas} replica(s): {exc.description or exc} (see [storage] "
                "replicas)"
            )
            if exc.err_code == _NO_PEERS and "offline" in (exc.description or ""):
                # A server of the cluster is down or not heard from (restarting, or slow under
                # load): placement may succeed once it is back, so asked again.
                raise _PeerOffline(refusal) from None
            raise refusal from None

    async def last_sequence(self) -> int:
        info = await self.js.stream_info(self.settings.name)
        return int(info.state.last_seq)

    async def stored(self, seq: int) -> Any:
        """The message stored at ``seq`` as written (nats-py's ``RawStreamMsg``: ``data``,
        ``headers``), or None when the stream holds none there (never written, or aged out of a
        stream with limits: ``first_sequence`` tells which)."""
        try:
            return await self.js.get_msg(self.settings.name, seq=seq)
        except NotFoundError:
            return None

    async def first_sequence(self) -> int:
        info = await self.js.stream_info(self.settings.name)
        return int(info.state.first_seq)

    async def has_after(self, seq: int, filter_subject: str) -> bool:
        """Whether the stream holds an event on ``filter_subject`` (wildcards allowed) after
        sequence ``seq``: one request for the next such message, not a read of the log."""
        try:
            await self.js.get_msg(
                self.settings.name, seq=seq + 1, subject=filter_subject, next=True
            )
        except NotFoundError:
            return False
        return True

    # --- append ---------------------------------------------------------------------------

    async def append(
        self,
        event: Event,
        *,
        subject: str | None = None,
        expected_last_subject_seq: int | None = None,
    ) -> Appended:
        """Append one event and wait for the stream's acknowledgement."""
        [appended] = await self.append_many(
            [event], subject=subject, expected_last_subject_seq=expected_last_subject_seq
        )
        return appended

    async def append_many(
        self,
        events: Sequence[Event],
        *,
        subject: str | None = None,
        expected_last_subject_seq: int | None = None,
        payloads: Sequence[bytes] | None = None,
    ) -> list[Appended]:
        """Publish all ``events`` pipelined, then collect their acknowledgements in order.
        ``payloads``: the events already encoded (a caller that wrote them elsewhere first).

        With ``expected_last_subject_seq`` the first event is fenced on it and each following one
        on its predecessor's sequence (all on one subject), so the batch lands contiguously or
        fails with :class:`ConcurrencyConflict` at the first event another writer got ahead of.
        """
        if expected_last_subject_seq is not None:
            return await self._append_fenced(events, subject, expected_last_subject_seq)
        encoded = payloads if payloads is not None else [None] * len(events)
        if len(events) > 1 and tracing.enabled():
            return await self._append_traced_batch(events, subject, encoded)
        tokens = [
            await self._publish(event, subject, None, payload=payload)
            for event, payload in zip(events, encoded, strict=True)
        ]
        return [await self._await_ack(t, e) for t, e in zip(tokens, events, strict=True)]

    async def _append_traced_batch(
        self, events: Sequence[Event], subject: str | None, payloads: Sequence[bytes | None]
    ) -> list[Appended]:
        # One PRODUCER span for the batch (the conventions' batch send); every event stores its
        # context as its creation context.
        appends = [
            (subject or self.settings.subject_for(event), event.id, event_tag(event))
            for event in events
        ]
        span, context = tracing.start_publish_batch(appends, self.settings.wildcard)
        try:
            acks = [
                await self._publish(event, to, None, context, payload=payload)
                for event, (to, _, _), payload in zip(events, appends, payloads, strict=True)
            ]
            appended = [
                await self._acknowledged(ack, event)
                for ack, event in zip(acks, events, strict=True)
            ]
        except BaseException as exc:
            tracing.end_publish(span, exc)
            raise
        tracing.end_publish(span, None)
        return appended

    async def _append_fenced(
        self, events: Sequence[Event], subject: str | None, expected: int
    ) -> list[Appended]:
        # Each fenced append needs its predecessor's sequence, so these go one at a time.
        appended = []
        for event in events:
            result = await self._await_ack(await self._publish(event, subject, expected), event)
            expected = result.seq
            appended.append(result)
        return appended

    async def _publish(
        self,
        event: Event,
        subject: str | None,
        expected: int | None,
        context: dict[str, str] | None = None,
        *,
        payload: bytes | None = None,
    ) -> _Ack:
        inbox = await self._reply_inbox()
        headers = {"Nats-Msg-Id": event.id}
        if expected is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
        ack = _Ack(subject or self.settings.subject_for(event), payload or encode(event))
        if context is not None:  # the batch's span: its context is every event's
            headers.update(context)
        elif tracing.enabled():  # a PRODUCER span per append; its context is stored with the event
            ack.span, context = tracing.start_publish(
                ack.subject, msg_id=event.id, event_type=event_tag(event)
            )
            headers.update(context)
        ack.headers = headers
        await self._send(inbox, ack)
        return ack

    async def _send(self, inbox: str, ack: _Ack) -> None:
        # Each attempt gets its own reply token; any attempt's acknowledgement completes ``ack``.
        self._next += 1
        name = str(self._next)
        token = name.encode()
        self._acks[token] = ack
        if ack.tokens:
            self.resends += 1
        ack.tokens.append(token)
        await self.nc.publish(
            ack.subject, ack.payload, reply=f"{inbox}.{name}", headers=ack.headers
        )

    async def _reply_inbox(self) -> str:
        if self._inbox is None:
            inbox = self.nc.new_inbox()
            await self.nc.subscribe_raw(f"{inbox}.*", self._on_ack)
            self._inbox = inbox
        return self._inbox

    def _on_ack(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        ack = self._acks.pop(subject.rpartition(b".")[2], None)
        if ack is None or ack.data is not None:
            return
        if not data and headers and headers.startswith(_NO_RESPONDERS):
            ack.retry = True  # no stream leader right now: send again shortly
        else:
            ack.data = data
        if ack.done is not None and not ack.done.done():
            ack.done.set_result(None)

    async def _await_ack(self, ack: _Ack, event: Event) -> Appended:
        if ack.span is None:
            return await self._acknowledged(ack, event)
        try:
            appended = await self._acknowledged(ack, event)
        except BaseException as exc:
            tracing.end_publish(ack.span, exc)
            raise
        tracing.end_publish(ack.span, None)
        return appended

    async def _acknowledged(self, ack: _Ack, event: Event) -> Appended:
        data = ack.data
        if data is not None and b'"error"' not in data:
            # The common case in a pipelined batch: acknowledged while the rest was published.
            for token in ack.tokens:
                self._acks.pop(token, None)
            return _parse_ack(data, event)
        deadline = anyio.current_time() + self.ack_timeout
        try:
            while True:
                if ack.data is None:
                    await self._wait_or_resend(ack, event, deadline)
                    continue
                if _retriable(ack.data) and anyio.current_time() < deadline:
                    if len(ack.tokens) == 1:  # (said once per event, however many times sent)
                        log.info(
                            "event log: %s for event %s; re-sending", _error_text(ack), event.id
                        )
                    ack.data = None
                    await self._pause_and_resend(ack, deadline)
                    continue
                return _parse_ack(ack.data, event)
        finally:
            for token in ack.tokens:
                self._acks.pop(token, None)

    async def _wait_or_resend(self, ack: _Ack, event: Event, deadline: float) -> None:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise InternalError(
                f"event log did not acknowledge event {event.id} within {self.ack_timeout} s"
            )
        if not ack.retry:
            # A bare future, made only when the acknowledgement has to be waited for, woken by
            # the acknowledgement, by the server refusing the publish, or by the resend timer.
            loop = asyncio.get_running_loop()
            ack.done = done = loop.create_future()
            timer = loop.call_later(min(self.resend_after, remaining), _wake, done)
            try:
                with self.nc.denial_watch(ack.subject, done):
                    await done
            finally:
                timer.cancel()
        if ack.data is not None:
            return
        denied = self.nc.permission_violation(ack.subject)
        if denied is not None:
            raise PermissionDenied(f"cannot append event {event.id} to {ack.subject}: {denied}")
        if ack.retry:
            await self._pause_and_resend(ack, deadline)
        elif anyio.current_time() < deadline:
            log.warning("event log: no acknowledgement for event %s yet; re-sending", event.id)
            await self._send(await self._reply_inbox(), ack)

    async def _pause_and_resend(self, ack: _Ack, deadline: float) -> None:
        # Doubling from a quarter of a second to two, each shortened by up to half at random:
        # publishers that met the same full queue or election do not all come back at once.
        pause = _RESEND_PAUSE_S * 2 ** min(len(ack.tokens) - 1, 3) * (0.5 + random.random() / 2)
        await anyio.sleep(max(0.0, min(pause, deadline - anyio.current_time())))
        ack.retry = False
        await self._send(await self._reply_inbox(), ack)

    # --- read -----------------------------------------------------------------------------

    def _unreadable(self, seq: int, subject: str, problem: str) -> None:
        if seq in self.unreadable:
            return
        if len(self.unreadable) < _UNREADABLE_KEPT:
            self.unreadable[seq] = f"{subject}: {problem}"
        log.error(
            "event log: the message stored at sequence %d (%s) is not an event (%s); skipped",
            seq,
            subject,
            problem,
        )

    async def replay(
        self, start_seq: int = 1, *, filter_subject: str | None = None
    ) -> AsyncGenerator[list[LogEntry[Event]], None]:
        """Yield the log from ``start_seq`` to its current end, in order, in batches."""
        filters = [filter_subject] if filter_subject else None
        async for batch in self.replay_batches(decode_events, start_seq, filter_subjects=filters):
            yield batch.entries()

    async def replay_batches(
        self,
        decode: Callable[[bytes], list[E]],
        start_seq: int = 1,
        *,
        filter_subjects: Sequence[str] | None = None,
    ) -> AsyncIterator[ReplayBatch[E]]:
        """:meth:`replay` as :class:`ReplayBatch` es, each batch decoded by ``decode`` (given a
        JSON array of the batch's events; e.g. ``vapora.budget_view.decode_views``), only the
        events on ``filter_subjects`` (default: the whole log); no entry made per event."""
        if await self.last_sequence() < start_seq:
            return
        async for batch in self._read(start_seq, filter_subjects, decode, follow=False):
            yield batch

    async def replay_since(
        self, since: datetime, *, filter_subject: str | None = None
    ) -> AsyncGenerator[list[LogEntry[Event]], None]:
        """:meth:`replay` of the events stored at or after ``since`` (the server's time of
        storing them), to the log's current end."""
        filters = [filter_subject] if filter_subject else None
        async for batch in self._read(0, filters, decode_events, follow=False, since=since):
            yield batch.entries()

    async def tail(
        self, start_seq: int = 1, *, filter_subject: str | None = None
    ) -> AsyncIterator[list[LogEntry[Event]]]:
        """Yield the log from ``start_seq`` on, forever (until the caller stops iterating)."""
        filters = [filter_subject] if filter_subject else None
        async for batch in self._read(start_seq, filters, decode_events, follow=True):
            yield batch.entries()

    async def _read(
        self,
        start_seq: int,
        filter_subjects: Sequence[str] | None,
        decode: Callable[[bytes], list[E]],
        *,
        follow: bool,
        since: datetime | None = None,
    ) -> AsyncIterator[ReplayBatch[E]]:
        """The log from ``start_seq`` (or from the first event stored at ``since``) through a
        pull consumer. When the consumer is known to be lost (its deletion or "no responders"
        answered a pull request, or a replay's pull went unanswered and the consumer is gone)
        reading goes on from the event after the last one given, through a new consumer. A
        tail that stalls without a word is restarted by its follower (:mod:`actors.follow`)."""
        next_seq = start_seq
        failures = 0  # losses in a row, with no batch read in between
        while True:
            by_time = since if next_seq == start_seq else None  # until the first batch is read
            reading = self._read_once(
                next_seq, filter_subjects, decode, follow=follow, since=by_time
            )
            try:
                async with contextlib.aclosing(reading):  # its consumer deleted on any exit
                    async for batch in reading:
                        next_seq = batch.seqs[-1] + 1
                        failures = 0
                        yield batch
                return
            except _ConsumerLost as lost:
                failures += 1
                if failures > _RESUMES:
                    raise InternalError(
                        f"reading the log lost its consumer {failures} times in a row "
                        f"(last: {lost}); giving up at sequence {next_seq}"
                    ) from None
                self.replay_resumes += 1
                log.warning("event log: %s; reading goes on from sequence %d", lost, next_seq)
                await anyio.sleep(min(0.1 * 2 ** (failures - 1), 2.0))

    async def _read_once(
        self,
        start_seq: int,
        filter_subjects: Sequence[str] | None,
        decode: Callable[[bytes], list[E]],
        *,
        follow: bool,
        since: datetime | None = None,
    ) -> AsyncGenerator[ReplayBatch[E], None]:
        filters = list(filter_subjects or [self.settings.wildcard])
        consumer = await self.js.add_consumer(
            self.settings.name,
            api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE
                if since is None
                else api.DeliverPolicy.BY_START_TIME,
                opt_start_seq=max(start_seq, 1) if since is None else None,
                opt_start_time=since,
                # One filter as ``filter_subject``: servers before 2.10 know no other.
                filter_subject=filters[0] if len(filters) == 1 else None,
                filter_subjects=filters if len(filters) > 1 else None,
                inactive_threshold=60.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        reader = _PullReader()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe_raw_batched(inbox, reader.on_batch)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.settings.name}.{consumer.name}"
        try:
            if not follow and not consumer.num_pending:
                return
            # A replay keeps two pull requests outstanding, so the server is already sending the
            # next batch while this one is decoded; a tail keeps one (it waits at the end).
            depth = 1 if follow else 2
            while True:
                while reader.outstanding < depth and (follow or not reader.caught_up):
                    reader.outstanding += 1
                    await self.nc.publish(next_subject, _pull_request(follow), reply=inbox)
                if follow:
                    raw = await reader.take()
                else:  # a replay's pull is answered at once: none means it is lost
                    with anyio.move_on_after(self.pull_timeout) as waited:
                        raw = await reader.take()
                    if waited.cancelled_caught:
                        raise _ConsumerLost(
                            f"no answer to a pull request on consumer {consumer.name} "
                            f"within {self.pull_timeout:g} s"
                        )
                if raw:
                    yield _batch(raw, decode, self._unreadable)
                if reader.lost is not None:
                    raise _ConsumerLost(f"consumer {consumer.name}: {reader.lost}")
                if reader.caught_up and not follow and not reader.buffer:
                    # Only once what came meanwhile is handed over too: the last messages may
                    # have arrived while the reader had an earlier batch.
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.settings.name, consumer.name)


class _ConsumerLost(Exception):
    """A replay's pull consumer is gone (or unreachable): the replay goes on with a new one."""


#: How many times in a row reading may go on with a new consumer before it gives up.
_RESUMES = 8

_PULL_BATCH = 4096
_TAIL_EXPIRES_NS = 30_000_000_000


def _pull_request(follow: bool) -> bytes:
    if follow:
        return b'{"batch":%d,"expires":%d}' % (_PULL_BATCH, _TAIL_EXPIRES_NS)
    return b'{"batch":%d,"no_wait":true}' % _PULL_BATCH


class _Ack:
    """One event's append: what to (re-)send, its reply tokens, and the acknowledgement."""

    __slots__ = ("data", "done", "headers", "payload", "retry", "span", "subject", "tokens")

    def __init__(self, subject: str, payload: bytes) -> None:
        self.subject = subject
        self.payload = payload
        self.headers: dict[str, str] = {}
        self.tokens: list[bytes] = []
        self.data: bytes | None = None
        self.retry = False
        self.done: asyncio.Future[None] | None = None
        self.span: Span | None = None


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class _PullReader:
    """Buffers a pull consumer's messages from the raw fast path; the reader decodes batches.

    The messages of each read arrive in one call (``on_batch``, a batched raw subscription) and
    are kept as they came, ``(subject, reply, data, headers)``: their stream sequences are in
    their reply subjects, read once per batch (:func:`_batch`), not once per message.
    """

    def __init__(self) -> None:
        self.buffer: list[RawMessage] = []
        self.outstanding = 0  # pull requests sent and not yet finished
        self.in_request = 0  # messages received for the oldest of them
        self.caught_up = False
        self.lost: str | None = None  # why the consumer is known to be gone
        self.ready = anyio.Event()
        self._short: bool | None = None  # the reply subjects' format (see _ack_tokens)

    def on_batch(self, messages: list[RawMessage]) -> None:
        reply = messages[-1][1]
        if not reply:  # a status (it comes alone): 404 no messages, 408 request expired, 409 ...
            status = messages[-1][3] or b""
            code = status[9:12]
            # The consumer is gone: deleted (a node's loss, a restart), or nobody serves its
            # pull requests any more. Other statuses end one request; pulling goes on.
            if code == b"503" or (code == b"409" and b"Consumer Deleted" in status):
                self.lost = status.split(b"\r\n", 1)[0].decode(errors="replace")
            self._finish_request()
            return
        self.buffer += messages
        received = self.in_request + len(messages)
        while received >= _PULL_BATCH:  # each pull request ends after that many messages
            received -= _PULL_BATCH
            self.outstanding = max(0, self.outstanding - 1)
        self.in_request = received
        short = self._short
        if short is None:
            short = self._short = reply.count(b".") == 8
        # In the short format the count of pending messages is the last token.
        if reply.endswith(b".0") if short else _ack_tokens(reply)[1] == 0:
            self.caught_up = True
        self.ready.set()

    def _finish_request(self) -> None:
        self.outstanding = max(0, self.outstanding - 1)
        self.in_request = 0
        self.ready.set()

    async def take(self) -> list[RawMessage]:
        if not self.buffer and self.outstanding:
            await self.ready.wait()
        self.ready = anyio.Event()
        raw, self.buffer = self.buffer, []
        return raw


def _ack_tokens(reply: bytes) -> tuple[int, int]:
    """The stream sequence and the pending count in a JetStream reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`` (9 tokens), or
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>.<x>``.
    """
    tokens = reply.split(b".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[7]), int(tokens[10])


def _sequences(raw: list[RawMessage]) -> Sequence[int]:
    # A consumer delivers the stream in order, each message once (no acks, no redelivery):
    # when the last sequence is the first plus the count, the batch is contiguous.
    first, last = _ack_tokens(raw[0][1])[0], _ack_tokens(raw[-1][1])[0]
    if last - first == len(raw) - 1:
        return range(first, last + 1)
    return [_ack_tokens(message[1])[0] for message in raw]


def _batch(
    raw: list[RawMessage],
    decode: Callable[[bytes], list[E]],
    unreadable: Callable[[int, str, str], None],
) -> ReplayBatch[E]:
    seqs = _sequences(raw)
    # One decoder call for the whole batch: msgspec parses a JSON array of events far faster
    # than it is called once per event.
    try:
        decoded = decode(b"[" + b",".join([message[2] for message in raw]) + b"]")
    except DecodeError:
        return _batch_one_by_one(seqs, raw, decode, unreadable)
    if len(decoded) != len(raw):
        # An empty message (nothing between the commas) or one holding two objects: the array
        # decoded, to one event too few or too many. Each message on its own says which.
        return _batch_one_by_one(seqs, raw, decode, unreadable)
    return ReplayBatch(seqs, raw, decoded)


def _batch_one_by_one(
    seqs: Sequence[int],
    raw: list[RawMessage],
    decode: Callable[[bytes], list[E]],
    unreadable: Callable[[int, str, str], None],
) -> ReplayBatch[E]:
    """The batch with an :class:`Unreadable` in the place of each stored message that is not an
    event (:meth:`EventLog._unreadable` names and counts it): every reader passes it by (waiting
    on it stopped them all at it for good) and its position moves past it."""
    decoded: list[Any] = []
    for seq, message in zip(seqs, raw, strict=True):
        try:
            events = decode(b"[" + message[2] + b"]")
            if len(events) != 1:
                raise DecodeError(f"the message holds {len(events)} events, not one")
            decoded.append(events[0])
        except DecodeError as exc:
            subject = message[0].decode(errors="replace")
            unreadable(seq, subject, str(exc))
            decoded.append(Unreadable(id=f"unreadable-{seq}", subject=subject, problem=str(exc)))
    return ReplayBatch(seqs, raw, decoded)


def _provider_of(event: Event) -> str | None:
    provider = getattr(event, "provider", None)
    return provider if isinstance(provider, str) else None


_COMPARED = (
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "duplicate_window",
    "max_age",
    "max_bytes",
    "deny_delete",
    "deny_purge",
    "allow_direct",
)


def stream_differences(
    current: api.StreamConfig, wanted: api.StreamConfig
) -> list[tuple[str, Any, Any]]:
    """Each setting vapora manages that differs: (name, the stream's value, the wanted one)."""
    return [
        (key, getattr(current, key), getattr(wanted, key))
        for key in _COMPARED
        if getattr(current, key) != getattr(wanted, key)
    ]


def _settings_match(current: api.StreamConfig, wanted: api.StreamConfig) -> bool:
    return all(getattr(current, key) == getattr(wanted, key) for key in _COMPARED)


# Unreadable messages remembered per log (each logged once); past it, each is logged again.
_UNREADABLE_KEPT = 10_000

# 503s that waiting does not cure: JetStream is not enabled (for the account, or at all).
_PERMANENT_503 = {10039, 10076}
# Answers that are not a decision about the event, whatever their status code: "duplicate
# message id is in process" (409: a clustered leader still proposes an earlier send of this
# event, which may yet be stored; sent again once it is, the answer is a duplicate's
# acknowledgement with its sequence) and "too many requests" (429: the stream's ingest queue
# was full and stored nothing).
_TRANSIENT = {10158, 10167}


def _retriable(data: bytes) -> bool:
    """A JetStream 503 (e.g. "JetStream system temporarily unavailable": no leader yet), or an
    answer that the event is still being stored or that the stream is too busy to take it."""
    if b'"error"' not in data:
        return False
    error = _ack_decoder.decode(data).error
    if error is None:
        return False
    code = error.get("err_code")
    return code in _TRANSIENT or (error.get("code") == 503 and code not in _PERMANENT_503)


def _error_text(ack: _Ack) -> str:
    error = _ack_decoder.decode(ack.data or b"{}").error or {}
    return str(error.get("description", "an error"))


def _parse_ack(data: bytes, event: Event) -> Appended:
    ack = _ack_decoder.decode(data)
    if ack.error is not None:
        code = ack.error.get("err_code")
        description = ack.error.get("description", "unknown error")
        if code in _WRONG_LAST_SEQUENCE:
            raise ConcurrencyConflict(
                f"event {event.id} ({event_tag(event)}) was not appended: another writer got "
                f"there first ({description})"
            )
        raise InternalError(f"event log refused event {event.id}: {description}")
    return Appended(ack.seq, ack.duplicate)
