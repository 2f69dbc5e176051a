"""A deployment for the observability tests: every actor on its own NATS connection (as separate
processes would be), the simulator over HTTP, telemetry recorded in memory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.connection import ConnectOptions, connect
from actors.cost_ledger import CostLedger
from actors.eventlog import EventLog
from actors.provider import ProviderActor
from actors.router import RouterActor
from actors.runner import Runtime, build
from actors.server import EmbeddedNats
from events.log import Event
from tests.fault.provider_harness import KEYS, config_text, make_config, wait_until_served
from vapora.client import Client
from vapora.config import Config, TelemetryConfig
from vapora.simulator import Simulator
from vapora.telemetry import setup

# Leases off: each paid attempt reserves with the keeper, so the keeper is part of the trace.
BUDGET = "[budget]\ndaily_limit_cents = 1000\nlease_cents = 0\n"


def guide(budget: str = BUDGET, **kw: object) -> Callable[[str], str]:
    """The guide's providers on the simulator, with ``budget``."""
    return lambda base_url: config_text(base_url, budget=budget, **kw)  # type: ignore[arg-type]


@dataclass
class Recorded:
    """Telemetry on in this process, spans and metrics kept in memory."""

    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


R = TypeVar("R", bound=Recorded)


def recording(kind: type[R]) -> Iterator[R]:
    """Set telemetry up recording into memory for the duration (the ``recorded`` fixtures):
    a ``kind`` (``Recorded`` or a subclass with more ways to read it)."""
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = setup(
        TelemetryConfig(enabled=True), env={}, span_exporters=[spans], metric_readers=[metrics]
    )
    yield kind(spans, metrics)
    telemetry.shutdown()


@dataclass
class Separate:
    server: EmbeddedNats
    sim: Simulator
    config: Config
    client: Client
    log: EventLog  # the test's own connection, for reading the log
    runtime: Callable[[str], Awaitable[Runtime]]  # another runtime on its own connection
    ledger: CostLedger | None = None
    router: RouterActor | None = None

    async def leased(self) -> None:
        """Until the router holds a budget lease (it asks for one at its start)."""
        assert self.router is not None
        with anyio.fail_after(10):
            while self.router.lease is None:  # noqa: ASYNC110 - set by the router's task
                await anyio.sleep(0.02)

    async def events(self) -> list[tuple[int, Event, dict[str, str]]]:
        out = []
        async for batch in self.log.replay():
            out.extend((entry.seq, entry.event, entry.headers) for entry in batch)
        return out

    async def ledger_caught_up(self) -> None:
        """Until the ledger has applied everything in the log."""
        assert self.ledger is not None
        last = await self.log.last_sequence()
        with anyio.fail_after(10):
            while self.ledger.position < last:  # noqa: ASYNC110 - moved by the ledger's task
                await anyio.sleep(0.02)


@contextlib.asynccontextmanager
async def separate_deployment(
    tmp_path: Path,
    config_for: Callable[[str], str],
    *,
    env: Mapping[str, str] = KEYS,
    providers: Sequence[str] | None = None,
    keeper: bool = True,
    ledger: bool = True,
    sim: Simulator | None = None,
) -> AsyncIterator[Separate]:
    """Ledger, keeper, provider actors and router, each with its own connection and runtime."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(EmbeddedNats(tmp_path / "nats"))
        if sim is None:
            sim = await stack.enter_async_context(Simulator())
        config = make_config(config_for(sim.base_url))

        async def runtime(name: str) -> Runtime:
            nc = await connect(ConnectOptions.from_url(server.url, name=name))
            stack.push_async_callback(nc.close)
            log = EventLog(nc)
            await log.ensure_stream()
            data_dir = tmp_path / name
            data_dir.mkdir(exist_ok=True)
            return Runtime(nc=nc, config=config, log=log, data_dir=data_dir, env=dict(env))

        reader = await runtime("reader")
        caller = await nats.connect(server.url, name="caller")
        stack.push_async_callback(caller.close)
        dep = Separate(server, sim, config, Client(caller, timeout_s=30), reader.log, runtime)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        actors: list[Any] = []
        if ledger:
            dep.ledger = CostLedger(await runtime("ledger"))
            actors.append(dep.ledger)
        if keeper:
            actors.append(build("budget", await runtime("keeper")))
        for name in providers if providers is not None else [p.name for p in config.providers]:
            actors.append(ProviderActor(await runtime(f"provider-{name}"), provider=name))
        dep.router = RouterActor(await runtime("router"), reserve=keeper)
        actors.append(dep.router)
        for actor in actors:
            await tg.start(actor.run)
            stack.callback(actor.stop)
        await wait_until_served(caller, "vapora.complete")
        yield dep
