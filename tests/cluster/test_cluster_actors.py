"""vapora's actors as separate OS processes (``vapora actor ...``) on a local 3-node JetStream
cluster running the generated per-actor users with verified TLS (the topology of
docker/compose.yaml), under a steady request load: SIGKILL a NATS node (the stream leader) and
restart it. Every request gets an answer or a clear error, no acknowledged event is lost or stored
twice, and ``vapora audit`` passes afterwards."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import yaml

from actors.cluster import LocalCluster
from actors.connection import Client as NatsClient
from actors.eventlog import EventLog
from events.log import Event, RouteDecided, SpendRecorded
from tests.cluster.certs import TlsFiles
from tests.cluster.conftest import PASSWORDS, connect_as, secured_config
from tests.cluster.processes import ROOT, ActorProcess, run_vapora, start_actor
from tests.fault.provider_harness import config_text
from vapora.cli.health import cmd_health
from vapora.client import Client
from vapora.errors import VaporaError
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio


def user_env(user: str) -> dict[str, str]:
    return {"VAPORA_NATS_USER": user, "VAPORA_NATS_PASSWORD": PASSWORDS[user]}


def write_config(path: Path, base_url: str, tls: TlsFiles) -> Path:
    tls_line = (
        f'[nats]\ntls = {{ ca = "{tls.ca}", cert = "{tls.client_cert}", '
        f'key = "{tls.client_key}" }}\n'
    )
    budget = "[budget]\ndaily_limit_cents = 1000000\nmonthly_limit_cents = 10000000\n"
    path.write_text(config_text(base_url, budget=budget, extra=tls_line))
    return path


@dataclass
class Secured:
    """A secured local cluster with vapora's actors running against it."""

    cluster: LocalCluster
    config_file: Path
    tmp: Path
    admin: NatsClient
    actors: list[ActorProcess] = field(default_factory=list)

    def start(self, kind: str, user: str, provider: str | None = None) -> ActorProcess:
        name = f"{kind}-{provider}" if provider else kind
        actor = start_actor(
            kind,
            url=self.cluster.url,
            config_file=self.config_file,
            data_dir=self.tmp / "data" / f"{name}-{len(self.actors)}",
            log_dir=self.tmp / "logs",
            provider=provider,
            env=user_env(user),
        )
        self.actors.append(actor)
        return actor

    async def events(self) -> list[tuple[Event, int]]:
        log = EventLog(self.admin)
        return [(e.event, e.seq) async for batch in log.replay() for e in batch]


@contextlib.asynccontextmanager
async def secured_deployment(tmp: Path, tls: TlsFiles) -> AsyncIterator[Secured]:
    async with contextlib.AsyncExitStack() as stack:
        cluster = await stack.enter_async_context(
            LocalCluster(tmp / "cluster", extra_config=secured_config(tls))
        )
        sim = await stack.enter_async_context(Simulator())
        admin = await connect_as(cluster.url, "admin", tls)
        stack.push_async_callback(admin.close)
        # The deployment's first start: admin creates the stream (R3: the server is clustered).
        info = await EventLog(admin).ensure_stream()
        assert info.config.num_replicas == 3
        deployment = Secured(
            cluster, write_config(tmp / "vapora.toml", sim.base_url, tls), tmp, admin
        )
        try:
            yield deployment
        finally:
            with anyio.CancelScope(shield=True):
                for actor in reversed(deployment.actors):
                    await actor.stop()


async def start_all(dep: Secured, routers: int = 1, per_provider: int = 1) -> None:
    actors = [dep.start("ledger", "ledger"), dep.start("budget", "budget")]
    for provider in ("gemini", "ollama"):
        actors += [dep.start("provider", "provider", provider) for _ in range(per_provider)]
    actors += [dep.start("router", "router") for _ in range(routers)]
    async with anyio.create_task_group() as tg:
        for actor in actors:
            tg.start_soon(actor.wait_ready)


@dataclass
class Load:
    """A steady stream of requests from ``workers`` concurrent callers until stopped."""

    client: Client
    workers: int = 6
    answers: list[str] = field(default_factory=list)
    errors: list[VaporaError] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in range(self.workers):
                tg.start_soon(self._worker, worker)

    async def _worker(self, worker: int) -> None:
        for n in range(10_000):  # bounded; stops when told
            if self.stop.is_set():
                return
            try:
                result = await self.client.complete(
                    prompt=f"question {worker}-{n}", task_type="GeneralQuery"
                )
                self.answers.append(result.task_id)
            except VaporaError as error:  # a clear error is an acceptable outcome
                self.errors.append(error)

    async def until_answers(self, count: int, within_s: float = 60.0) -> None:
        with anyio.fail_after(within_s):
            while len(self.answers) < count:  # noqa: ASYNC110 - counted by other tasks
                await anyio.sleep(0.05)


async def stream_leader(dep: Secured) -> int:
    info = await EventLog(dep.admin).js.stream_info("VAPORA_EVENTS")
    assert info.cluster is not None and info.cluster.leader
    return dep.cluster.index_of(info.cluster.leader)


def assert_books_hold(events: list[tuple[Event, int]], answered: list[str]) -> None:
    ids = [event.id for event, _ in events]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    spent = {e.task_id for e, _ in events if isinstance(e, SpendRecorded)}
    routed = {e.task_id for e, _ in events if isinstance(e, RouteDecided)}
    missing = [task for task in answered if task not in spent or task not in routed]
    assert not missing, f"answered tasks without their events: {missing[:5]}"


async def assert_compose_health_checks_pass(dep: Secured) -> None:
    """docker/compose.yaml's health check of each actor, run against the real actors here (as
    the router user; the providers that run here)."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    names = [s["healthcheck"]["test"][-1] for s in compose["services"].values() if "build" in s]
    running = {"router", "vapora-budget", "vapora-ledger", "provider-gemini", "provider-ollama"}
    assert running <= set(names)
    with _environment(user_env("router")):
        for name in sorted(running):
            args = argparse.Namespace(
                config=str(dep.config_file), nats_url=dep.cluster.url, service=name, timeout=5.0
            )
            assert await cmd_health(args) == 0, name


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def summary(text: str) -> str:
    lines = [line for line in text.splitlines() if "WARNING" not in line and line.strip()]
    return lines[-1] if lines else ""


async def audit(dep: Secured) -> tuple[int, str]:
    data_dir = dep.tmp / "data" / "ledger-0"
    assert (data_dir / "ledger.sqlite3").exists()
    return await run_vapora(
        "audit",
        "--nats-url",
        dep.cluster.url,
        "--config",
        str(dep.config_file),
        "--data-dir",
        str(data_dir),
        env=user_env("admin"),
    )


async def test_actors_ride_through_the_stream_leader_being_killed_and_the_audit_passes(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    async with secured_deployment(tmp_path, tls_files) as dep:
        await start_all(dep)
        nc = await connect_as(dep.cluster.url, "client", tls_files)
        load = Load(Client(nc, timeout_s=20))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(load.run)
                await load.until_answers(30)
                victim = await stream_leader(dep)
                dep.cluster.kill(victim)
                killed_at = len(load.answers)
                await anyio.sleep(3)
                await dep.cluster.restart(victim)
                await load.until_answers(killed_at + 60)
                load.stop.set()
            # The other three public subjects, as the client user, over TLS.
            streamed = [chunk async for chunk in load.client.stream(prompt="stream it")]
            assert "".join(streamed)
            assert (await load.client.budget()).tier
            assert (await load.client.report()) is not None
        finally:
            await nc.close()
        logs = "\n".join(actor.log() for actor in dep.actors)
        assert all(actor.process.poll() is None for actor in dep.actors), logs[-3000:]
        assert len(load.answers) > killed_at + 30
        assert not load.errors or all(e.code for e in load.errors)
        assert_books_hold(await dep.events(), load.answers)
        code, text = await audit(dep)
        assert code == 0, text
        await assert_compose_health_checks_pass(dep)
        print(
            f"\ncluster fault: {len(load.answers)} answered, {len(load.errors)} errors "
            f"({sorted({e.code for e in load.errors})}), node {victim + 1} killed after "
            f"{killed_at}; audit: {summary(text)}"
        )


async def test_two_routers_and_two_actors_per_provider_lose_nothing_when_one_of_each_is_killed(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    async with secured_deployment(tmp_path, tls_files) as dep:
        await start_all(dep, routers=2, per_provider=2)
        nc = await connect_as(dep.cluster.url, "client", tls_files)
        load = Load(Client(nc, timeout_s=10))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(load.run)
                await load.until_answers(30)
                routers = [a for a in dep.actors if a.kind == "router"]
                gemini = [a for a in dep.actors if a.provider == "gemini"]
                routers[0].kill()
                gemini[0].kill()
                killed_at = len(load.answers)
                await load.until_answers(killed_at + 60)
                load.stop.set()
        finally:
            await nc.close()
        survivors = [a for a in dep.actors if a.process.poll() is None]
        assert len(survivors) == len(dep.actors) - 2
        # Requests in flight in the killed router cannot be answered: their callers get a clear
        # timeout (at most one per concurrent caller); every other request is answered.
        assert all(e.code == "timeout" for e in load.errors), load.errors[:3]
        assert len(load.errors) <= load.workers
        assert_books_hold(await dep.events(), load.answers)
        code, text = await audit(dep)
        assert code == 0, text
        print(
            f"\nscale kill: {len(load.answers)} answered, {len(load.errors)} timed out in the "
            f"killed router; audit: {summary(text)}"
        )
