"""The event log on a real JetStream: the stream's settings, deduplicated and fenced appends,
pipelined batches, replay in order from any sequence, and a live tail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest
from nats import errors as nats_errors
from nats.js import api

from actors.connection import Client
from actors.eventlog import EventLog, LogEntry, StreamSettings, Unreadable
from actors.follow import LogFollower
from events import BudgetReleased, Event
from tests.samples import EVENTS
from vapora.budget_view import decode_views
from vapora.errors import ConcurrencyConflict, InternalError

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def released(n: int) -> BudgetReleased:
    return BudgetReleased(
        id=f"ev-{n}",
        at=T0 + timedelta(seconds=n),
        task_id=f"task-{n}",
        reservation_id=f"r-{n}",
        reason="settled",
    )


async def append_released(log: EventLog, total: int) -> None:
    """``total`` events (``released(0)`` on), 2,000 at a time."""
    for start in range(0, total, 2000):
        await log.append_many([released(n) for n in range(start, min(start + 2000, total))])


async def read_all(log: EventLog, start: int = 1) -> list[LogEntry]:
    return [entry async for batch in log.replay(start) for entry in batch]


async def test_the_stream_is_file_backed_limits_retention_and_undeletable(
    event_log: EventLog,
) -> None:
    info = await event_log.js.stream_info(event_log.settings.name)
    assert info.config.storage == api.StorageType.FILE
    assert info.config.retention == api.RetentionPolicy.LIMITS
    assert info.config.deny_delete and info.config.deny_purge
    assert info.config.duplicate_window == 120
    assert (await event_log.ensure_stream()).config.subjects == [event_log.settings.wildcard]


async def test_deleting_an_event_is_refused(event_log: EventLog) -> None:
    await event_log.append(released(1))
    with pytest.raises(Exception, match="delete"):
        await event_log.js.delete_msg(event_log.settings.name, 1)


async def test_every_event_type_is_appended_to_its_writers_subject_and_replayed(
    event_log: EventLog,
) -> None:
    for event in EVENTS.values():
        await event_log.append(event)
    entries = await read_all(event_log)
    assert [e.event for e in entries] == list(EVENTS.values())
    prefix = event_log.settings.prefix
    subjects = {type(e.event).__name__: e.subject for e in entries}
    assert subjects["SpendRecorded"] == f"{prefix}.spend.claude"
    assert subjects["BudgetReserved"] == f"{prefix}.budget"
    assert subjects["RouteDecided"] == f"{prefix}.route"
    assert entries[0].headers["Nats-Msg-Id"] == "ev-route-1"


async def test_appending_the_same_event_id_twice_stores_it_once(event_log: EventLog) -> None:
    first = await event_log.append(released(1))
    again = await event_log.append(released(1))
    assert not first.duplicate and again.duplicate
    assert again.seq == first.seq
    assert [e.event for e in await read_all(event_log)] == [released(1)]


async def test_a_second_writer_on_a_fenced_subject_gets_a_conflict(event_log: EventLog) -> None:
    subject = f"{event_log.settings.prefix}.budget"
    first = await event_log.append(released(1), expected_last_subject_seq=0)
    # Writer A appends on top of what it knows ...
    await event_log.append(released(2), expected_last_subject_seq=first.seq)
    # ... writer B, which still believes the subject ends at `first`, must not write.
    with pytest.raises(ConcurrencyConflict, match="another writer got there first"):
        await event_log.append(released(3), expected_last_subject_seq=first.seq)
    assert [e.event.id for e in await read_all(event_log)] == ["ev-1", "ev-2"]
    assert all(e.subject == subject for e in await read_all(event_log))


async def test_a_fenced_batch_lands_contiguously(event_log: EventLog) -> None:
    appended = await event_log.append_many(
        [released(n) for n in range(5)], expected_last_subject_seq=0
    )
    assert [a.seq for a in appended] == [1, 2, 3, 4, 5]
    with pytest.raises(ConcurrencyConflict):
        await event_log.append_many([released(9)], expected_last_subject_seq=3)


async def test_pipelined_appends_are_acknowledged_in_order(event_log: EventLog) -> None:
    appended = await event_log.append_many([released(n) for n in range(2000)])
    assert [a.seq for a in appended] == list(range(1, 2001))
    assert await event_log.last_sequence() == 2000


async def test_concurrent_appenders_share_one_connection(event_log: EventLog) -> None:
    async with anyio.create_task_group() as tg:
        for start in range(0, 1000, 100):
            tg.start_soon(event_log.append_many, [released(n) for n in range(start, start + 100)])
    ids = sorted(int(e.event.id[3:]) for e in await read_all(event_log))
    assert ids == list(range(1000))


@pytest.mark.parametrize("start", [1, 2, 777, 9999, 10000])
async def test_replay_returns_events_in_order_from_any_sequence(
    event_log: EventLog, start: int
) -> None:
    await event_log.append_many([released(n) for n in range(10000)])
    entries = await read_all(event_log, start)
    assert [e.seq for e in entries] == list(range(start, 10001))
    assert [e.event for e in entries] == [released(n) for n in range(start - 1, 10000)]


async def test_replay_past_the_end_or_of_an_empty_log_yields_nothing(event_log: EventLog) -> None:
    assert await read_all(event_log) == []
    await event_log.append(released(1))
    assert await read_all(event_log, 2) == []


async def test_replay_can_filter_one_subject(event_log: EventLog) -> None:
    for event in EVENTS.values():
        await event_log.append(event)
    entries = [
        e
        async for batch in event_log.replay(1, filter_subject=f"{event_log.settings.prefix}.budget")
        for e in batch
    ]
    assert [type(e.event).__name__ for e in entries] == [
        "BudgetReserved",
        "BudgetReleased",
        "BudgetLeased",
        "BudgetLeaseReturned",
        "BudgetTierChanged",
    ]


async def test_tail_delivers_past_and_live_events(event_log: EventLog) -> None:
    await event_log.append_many([released(n) for n in range(3)])
    seen: list[Event] = []

    async def follow() -> None:
        async for batch in event_log.tail(2):
            seen.extend(e.event for e in batch)
            if len(seen) >= 4:
                return

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.2)
            await event_log.append_many([released(3), released(4)])
    assert [e.id for e in seen] == ["ev-1", "ev-2", "ev-3", "ev-4"]


async def test_a_stored_message_that_is_no_event_is_named_counted_and_skipped(
    event_log: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    """Waiting on it stopped every reader at it for good (the keeper and the ledger retried it
    forever and could not start again); now each read skips it, the log names it once and
    keeps it in ``unreadable`` for the audit."""
    await event_log.append(released(1))
    await event_log.nc.publish(f"{event_log.settings.prefix}.budget", b'{"type": "nonsense"}')
    await event_log.append(released(3))
    await event_log.nc.flush()
    for _ in range(2):
        first, skipped, third = await read_all(event_log)
        assert (first.event.id, third.event.id) == ("ev-1", "ev-3")
        # In its place, so that a reader's position moves past it: nothing a reader folds.
        assert isinstance(skipped.event, Unreadable) and skipped.seq == 2
        assert skipped.event.id == "unreadable-2" and "'nonsense'" in skipped.event.problem
    [(seq, problem)] = event_log.unreadable.items()
    assert seq == 2 and ".events.budget" in problem and "'nonsense'" in problem
    said = [r.getMessage() for r in caplog.records if "is not an event" in r.getMessage()]
    assert len(said) == 1 and "sequence 2" in said[0]


async def test_a_corrupt_stored_event_is_skipped_by_a_replay_into_budget_views_too(
    event_log: EventLog,
) -> None:
    """The keeper's restart path (its own decoder, batches as read) skips and names it too."""
    await event_log.append(released(1))
    await event_log.nc.publish(
        f"{event_log.settings.prefix}.spend.x", b'{"type": "spend_recorded", "id": "s"}'
    )
    await event_log.append(released(3))
    await event_log.nc.flush()
    batches = [batch async for batch in event_log.replay_batches(decode_views, 1)]
    assert [seq for batch in batches for seq in batch.seqs] == [1, 2, 3]
    assert isinstance([e for b in batches for e in b.events][1], Unreadable)
    assert "field `at`" in event_log.unreadable[2]


async def test_a_follower_moves_past_a_last_message_that_is_no_event(event_log: EventLog) -> None:
    """Passed by without a position, the follower saw the stream ahead of it for ever and
    reopened its tail every few seconds."""
    await event_log.append(released(1))
    await event_log.nc.publish(f"{event_log.settings.prefix}.budget", b"not json")
    await event_log.nc.flush()
    position = 0

    async def apply(batch: list[LogEntry[Event]]) -> None:
        nonlocal position
        position = batch[-1].seq

    follower = LogFollower(event_log, name="t", apply=apply, position=lambda: position, stall_s=0.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(follower.run)
            while position < 2:  # noqa: ASYNC110 - moved by the follower's task
                await anyio.sleep(0.01)
            assert await event_log.last_sequence() == position  # nothing left it waits on
            tg.cancel_scope.cancel()


async def test_a_stream_created_whose_reply_was_lost_is_found_when_asked_again(
    nc: Client, unique: str
) -> None:
    # As seen on a cluster just formed: JetStream created the stream, its reply never came.
    log = EventLog(nc, StreamSettings(name=f"L_{unique}", prefix=f"l{unique}.events"))
    real_add = log.js.add_stream
    calls: list[str] = []

    async def created_then_lost(config: api.StreamConfig, **kw: object) -> api.StreamInfo:
        calls.append("add")
        await real_add(config, **kw)  # type: ignore[arg-type]
        raise nats_errors.TimeoutError

    log.js.add_stream = created_then_lost  # type: ignore[method-assign]
    info = await log.ensure_stream()
    assert calls == ["add"]  # asked again: found, not created twice
    assert info.config.name == f"L_{unique}" and info.config.subjects == [log.settings.wildcard]


async def test_a_stream_jetstream_never_answers_for_fails_after_the_attempts(
    nc: Client, unique: str
) -> None:
    log = EventLog(nc, StreamSettings(name=f"N_{unique}", prefix=f"n{unique}.events"))
    calls: list[str] = []

    async def unanswered(*args: object, **kw: object) -> api.StreamInfo:
        calls.append("info")
        raise nats_errors.TimeoutError

    log.js.stream_info = unanswered  # type: ignore[method-assign]
    with pytest.raises(nats_errors.TimeoutError):
        await log.ensure_stream(attempts=3)
    assert calls == ["info"] * 3


async def test_a_replay_whose_consumer_vanishes_goes_on_with_every_event_once(
    event_log: EventLog,
) -> None:
    """The consumer a replay reads through is deleted between two of its batches (a server
    restart or a lost node takes it): the pull requests sent to it are never answered, so the
    replay checks it, finds it gone, and goes on from the event after the last it gave, with
    a new consumer. It used to wait for ever (the keeper's and the ledger's start among them)."""
    total = 10_000  # three batches of 4096
    await append_released(event_log, total)
    event_log.pull_timeout = 0.5
    seqs: list[int] = []
    with anyio.fail_after(60):
        async for batch in event_log.replay(1):
            seqs.extend(entry.seq for entry in batch)
            if len(seqs) == len(batch):  # after the first batch: the consumer goes
                stream = event_log.settings.name
                for info in await event_log.js.consumers_info(stream):
                    await event_log.js.delete_consumer(stream, info.name)
    assert seqs == list(range(1, total + 1))  # none lost, none twice, in order
    assert event_log.replay_resumes >= 1


async def test_a_replays_pull_requests_lost_without_a_word_are_noticed(
    event_log: EventLog,
) -> None:
    """Pull requests that never arrive (lost with a connection or a node, no status coming
    back): a replay's pulls are answered at once, so after ``pull_timeout`` without an answer
    it goes on through a new consumer, every event once."""
    total = 14_000  # four pulls of 4096
    await append_released(event_log, total)
    event_log.pull_timeout = 0.5
    publish = event_log.nc.publish
    first: list[str] = []  # the first consumer's pull subject
    dropped: list[str] = []

    async def lossy(subject: str, payload: bytes = b"", **kw: object) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            first[:] = first or [subject]
            if seqs and subject == first[0]:  # every pull on it after the first batch: lost
                dropped.append(subject)
                return
        await publish(subject, payload, **kw)  # type: ignore[arg-type]

    seqs: list[int] = []
    event_log.nc.publish = lossy  # type: ignore[method-assign]
    with anyio.fail_after(60):
        async for batch in event_log.replay(1):
            seqs.extend(entry.seq for entry in batch)
    assert dropped and seqs == list(range(1, total + 1))
    assert event_log.replay_resumes >= 1


@pytest.mark.parametrize("pause", [0.0, 0.05])
async def test_a_replay_read_slowly_gives_every_event_to_the_end(
    event_log: EventLog, pause: float
) -> None:
    """The last pull's messages came in while an earlier batch was with the reader: the replay
    saw it had caught up and returned without handing them over. The tail of the log was lost
    to every replay (the audit read up to sequence 60,453 of 61,862 and reported differences
    the keeper did not have, or missed real ones)."""
    total = 14_000  # four pulls of 4096, two kept outstanding
    await append_released(event_log, total)
    seqs: list[int] = []
    with anyio.fail_after(60):
        async for batch in event_log.replay(1):
            seqs.extend(entry.seq for entry in batch)
            await anyio.sleep(pause)  # a reader doing its work: the server sends meanwhile
    assert seqs == list(range(1, total + 1))


IN_PROCESS = (
    b'{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}'
)
TOO_MANY = b'{"error":{"code":429,"err_code":10167,"description":"too many requests"}}'
REFUSED = b'{"error":{"code":400,"err_code":10077,"description":"maximum messages exceeded"}}'


@pytest.mark.parametrize(
    ("answers", "outcome"),
    [
        # A clustered leader still proposing an earlier send of the event (seen in the cluster
        # test, its leader killed): refused at once before, though it was stored a moment later.
        ([IN_PROCESS, IN_PROCESS], "stored"),
        ([TOO_MANY], "stored"),  # the stream's ingest queue was full: nothing stored yet
        ([REFUSED], "maximum messages exceeded"),  # a decision: not asked again
    ],
)
async def test_an_answer_that_is_no_decision_about_the_event_is_asked_again(
    nc: Client, unique: str, answers: list[bytes], outcome: str
) -> None:
    """The stream's answers are scripted by a subscriber on the log's subjects (one server
    cannot be driven into them); after the script, it acknowledges as a leader does."""
    log = EventLog(nc, StreamSettings(name=f"S_{unique}", prefix=f"s{unique}.events"))
    script = list(answers)
    ids: list[str] = []

    async def leader(msg: object) -> None:
        ids.append(msg.headers["Nats-Msg-Id"])  # type: ignore[attr-defined]
        answer = script.pop(0) if script else b'{"stream":"S","seq":7,"duplicate":true}'
        await nc.publish(msg.reply, answer)  # type: ignore[attr-defined]

    await nc.subscribe(f"s{unique}.events.>", cb=leader)
    await nc.flush()
    event = released(1)
    if outcome == "stored":
        appended = await log.append(event)
        assert (appended.seq, appended.duplicate) == (7, True)
        assert ids == [event.id] * (len(answers) + 1)  # the same message id each time
    else:
        with pytest.raises(InternalError, match=outcome):
            await log.append(event)
        assert ids == [event.id]
