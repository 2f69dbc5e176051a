"""The event log on a real 3-node JetStream cluster on loopback: R3 when clustered, and appends
that ride through a SIGKILLed node (the stream leader, or the node the writer is connected to),
with no acknowledged event lost and none stored twice."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from actors.cluster import LocalCluster, stream_replicas
from actors.connection import Client, ConnectionFailed, ConnectOptions, connect
from actors.eventlog import Appended, EventLog, StreamSettings
from actors.server import EmbeddedNats
from events import BudgetReleased
from vapora.errors import InternalError

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def released(run: str, n: int) -> BudgetReleased:
    return BudgetReleased(
        id=f"{run}-{n}", at=T0, task_id=f"task-{n}", reservation_id=f"r-{n}", reason="settled"
    )


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(tmp_path_factory.mktemp("cluster")) as local:
        yield local


async def connected(cluster: LocalCluster) -> Client:
    return await connect(ConnectOptions.from_url(cluster.url, name="test", reconnect_wait=0.2))


def settings(unique: str) -> StreamSettings:
    return StreamSettings(name=f"C_{unique}", prefix=f"c{unique}.events")


async def test_the_stream_gets_three_replicas_on_a_cluster(
    cluster: LocalCluster, unique: str
) -> None:
    nc = await connected(cluster)
    try:
        info = await EventLog(nc, settings(unique)).ensure_stream()
        assert stream_replicas(nc) == 3
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await nc.close()


async def test_the_stream_stays_single_on_a_single_server(
    nats_server: EmbeddedNats, unique: str
) -> None:
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    try:
        info = await EventLog(nc, settings(unique)).ensure_stream()
        assert info.config.num_replicas == 1
    finally:
        await nc.close()


async def test_a_configured_replica_count_wins(cluster: LocalCluster, unique: str) -> None:
    nc = await connected(cluster)
    try:
        log = EventLog(nc, StreamSettings(name=f"C_{unique}", prefix=f"c{unique}.e", replicas=1))
        assert (await log.ensure_stream()).config.num_replicas == 1
    finally:
        await nc.close()


async def test_a_fenced_append_sent_twice_is_a_duplicate_not_a_conflict(
    cluster: LocalCluster, unique: str
) -> None:
    nc = await connected(cluster)
    try:
        log = EventLog(nc, settings(unique))
        await log.ensure_stream()
        event, subject = released(unique, 0), f"c{unique}.events.budget"
        first = await log.append(event, subject=subject, expected_last_subject_seq=0)
        again = await log.append(event, subject=subject, expected_last_subject_seq=0)
        assert again == Appended(first.seq, duplicate=True)
    finally:
        await nc.close()


async def _append_steadily(
    log: EventLog, run: str, writer: int, acked: dict[str, int], stop: anyio.Event
) -> None:
    """Append one event at a time until ``stop`` (bounded: at most 2000 events)."""
    for n in range(2000):
        if stop.is_set():
            return
        event = released(run, writer * 10_000 + n)
        acked[event.id] = (await log.append(event)).seq
        await anyio.sleep(0.005)


async def _log_contents(log: EventLog) -> list[tuple[str, int]]:
    return [(e.event.id, e.seq) async for batch in log.replay() for e in batch]


@pytest.mark.parametrize("victim", ["stream leader", "writer's server"])
async def test_a_killed_node_loses_and_duplicates_no_acknowledged_event(
    cluster: LocalCluster, unique: str, victim: str
) -> None:
    writer_nc, reader_nc = await connected(cluster), await connected(cluster)
    log = EventLog(writer_nc, settings(unique), resend_after=1.0)
    await log.ensure_stream()
    info = await log.js.stream_info(log.settings.name)
    assert info.cluster is not None and info.cluster.leader
    name = (
        info.cluster.leader if victim == "stream leader" else writer_nc._server_info["server_name"]
    )
    node = cluster.index_of(name)
    acked: dict[str, int] = {}
    stop = anyio.Event()
    run = uuid.uuid4().hex[:8]
    try:
        async with anyio.create_task_group() as tg:
            for writer in range(3):
                tg.start_soon(_append_steadily, log, run, writer, acked, stop)
            await anyio.sleep(1.0)
            before_kill = len(acked)
            cluster.kill(node)
            await anyio.sleep(2.0)
            await cluster.restart(node)
            await anyio.sleep(1.0)
            stop.set()
        # Read back through another connection, so nothing is served from the writer's state.
        stored = await _log_contents(EventLog(reader_nc, settings(unique)))
    finally:
        await writer_nc.close()
        await reader_nc.close()
    ids = [event_id for event_id, _ in stored]
    assert before_kill > 0 and len(acked) > before_kill  # appends went on through the fault
    if victim == "stream leader":  # appends met the election: they were sent again
        assert log.resends > 0, "no append waited for the new leader: the test proved nothing"
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert dict(stored) == acked, "an acknowledged event is missing or moved"


async def test_an_append_nobody_stores_is_retried_then_fails_clearly(
    nats_server: EmbeddedNats, unique: str
) -> None:
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    try:
        # No stream listens on this prefix: every attempt meets "no responders".
        log = EventLog(nc, settings(unique), ack_timeout=1.0, resend_after=0.2)
        with pytest.raises(InternalError, match=f"{unique}-1 within 1.0 s"):
            await log.append(released(unique, 1))
    finally:
        await nc.close()


async def test_a_stream_placement_refused_for_a_peer_offline_is_asked_again(
    nats_server: EmbeddedNats, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "no suitable peers for placement, peer offline" (JSClusterNoPeersErrF) ended an actor's
    # start at once, also when the node was only restarting: a cluster test's stream, made just
    # after a killed node came back, failed so under load. The server's answer is put into
    # nats-py's JetStream context (a real cluster gives it only in a narrow window).
    from nats.js.client import JetStreamContext
    from nats.js.errors import APIError

    real_add = JetStreamContext.add_stream
    refusals: list[str] = []
    asked: list[str] = []

    async def add_stream(js: JetStreamContext, config: object = None, **kw: object) -> object:
        asked.append("add")
        if refusals:
            raise APIError(code=400, err_code=10005, description=refusals.pop(0))
        return await real_add(js, config, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(JetStreamContext, "add_stream", add_stream)
    offline = "no suitable peers for placement, peer offline"
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    try:
        refusals[:] = [offline, offline]
        info = await EventLog(nc, settings(unique)).ensure_stream()
        assert info.config.name == f"C_{unique}" and len(asked) == 3
        refusals[:], asked[:] = [offline] * 3, []
        with pytest.raises(ConnectionFailed, match="peer offline"):
            await EventLog(nc, settings(unique + "x")).ensure_stream(attempts=2)
        assert len(asked) == 2
        refusals[:], asked[:] = ["no suitable peers for placement, tags not matched ['ssd']"], []
        with pytest.raises(ConnectionFailed, match="tags not matched"):
            await EventLog(nc, settings(unique + "y")).ensure_stream()
        assert len(asked) == 1  # a refusal no wait mends is not asked again
    finally:
        await nc.close()
