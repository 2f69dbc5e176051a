"""A whole vapora deployment for the routing-pipeline tests: a fresh nats-server with JetStream, the
provider simulator over real HTTP, provider actors and the router, all wired as ``vapora up`` does,
with fake API keys in the runtime's environment."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors

from actors.connection import Client as NatsClient
from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog
from actors.provider import ProviderActor
from actors.router import RouterActor
from actors.runner import Runtime, build
from actors.server import EmbeddedNats
from events.log import Event
from vapora.client import Client
from vapora.config import Config, parse_config
from vapora.simulator import Simulator

KEYS = {
    "ANTHROPIC_API_KEY": "sk-ant-TEST-SECRET-0123456789",
    "OPENAI_API_KEY": "sk-openai-TEST-SECRET-0123456789",
    "GOOGLE_API_KEY": "google-TEST-SECRET-0123456789",
}

MODELS = {
    "claude": "claude-opus-4-5",
    "openai": "gpt-4",
    "gemini": "gemini-2.0-flash",
    "ollama": "llama2",
}
KINDS = {"claude": "anthropic", "openai": "openai", "gemini": "gemini", "ollama": "ollama"}
PRICES = {"claude": "0.015", "openai": "0.030", "gemini": "0.005", "ollama": "0.0"}

RULES = """
[[routing_rules]]
task_type = "CodeGeneration"
primary_provider = "claude"
fallback_chain = ["openai", "gemini"]

[[routing_rules]]
task_type = "CodeReview"
primary_provider = "claude"
fallback_chain = ["openai"]

[[routing_rules]]
task_type = "Documentation"
primary_provider = "openai"
fallback_chain = ["claude", "gemini"]

[[routing_rules]]
task_type = "GeneralQuery"
primary_provider = "gemini"
fallback_chain = ["ollama", "openai"]
"""


def config_text(
    base_url: str,
    *,
    models: Mapping[str, str] | None = None,
    timeouts: Mapping[str, int] | None = None,
    rpm: Mapping[str, int] | None = None,
    budget: str = "",
    extra: str = "",
) -> str:
    """The guide's four providers, all on the simulator at ``base_url``."""
    models = {**MODELS, **(models or {})}
    blocks = []
    for priority, name in enumerate(MODELS, start=1):
        kind = KINDS[name]
        url = base_url + "/v1" if kind == "openai" else base_url
        key = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}.get(kind)
        key = key or ("GOOGLE_API_KEY" if kind == "gemini" else None)
        lines = [
            "[[providers]]",
            f'name = "{name}"',
            f'kind = "{kind}"',
            f'model = "{models[name]}"',
            f'base_url = "{url}"',
            f"priority = {priority}",
            f"cost_per_1k_tokens = {PRICES[name]}",
            f"timeout_ms = {(timeouts or {}).get(name, 10_000)}",
            f"rate_limit_rpm = {(rpm or {}).get(name, 10_000_000)}",
        ]
        if key:
            lines.append(f'api_key_env = "{key}"')
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" + RULES + "\n" + budget + "\n" + extra


def make_config(text: str) -> Config:
    return parse_config(text, source="test.toml", at=datetime.now(UTC))


@dataclass
class Deployment:
    server: EmbeddedNats
    nc: NatsClient
    log: EventLog
    runtime: Runtime
    sim: Simulator
    client: Client
    providers: dict[str, ProviderActor] = field(default_factory=dict)
    router: RouterActor | None = None

    async def events(self) -> list[Event]:
        """Every event in the log, in order."""
        out: list[Event] = []
        async for batch in self.log.replay():
            out.extend(entry.event for entry in batch)
        return out

    async def events_of(self, task_id: str) -> list[Event]:
        return [e for e in await self.events() if getattr(e, "task_id", None) == task_id]


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path,
    config_for: Any,
    *,
    env: Mapping[str, str] = KEYS,
    providers: list[str] | None = None,
    router: bool = True,
    keeper: bool = False,
    router_options: Mapping[str, Any] | None = None,
    provider_options: Mapping[str, Any] | None = None,
    sim: Simulator | None = None,
    server_config: str = "",
) -> AsyncIterator[Deployment]:
    """``config_for(base_url) -> config text``; starts the named provider actors (default all)
    and the router, yields, then stops everything. ``server_config``: nats-server settings
    added to (and overriding) the embedded server's."""
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            EmbeddedNats(tmp_path / "nats", extra_config=server_config)
        )
        if sim is None:
            sim = await stack.enter_async_context(Simulator())
        config = make_config(config_for(sim.base_url))
        nc = await connect(ConnectOptions.from_url(server.url, name="vapora-test"))
        stack.push_async_callback(nc.close)
        log = EventLog(nc)
        await log.ensure_stream()
        runtime = Runtime(nc=nc, config=config, log=log, data_dir=tmp_path, env=dict(env))
        # Callers are other services: plain nats-py, not the actors' connection class.
        caller = await nats.connect(server.url, name="caller")
        stack.push_async_callback(caller.close)
        dep = Deployment(server, nc, log, runtime, sim, Client(caller, timeout_s=30))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        if keeper:  # the real budget keeper (issue 5), as `vapora up` runs it
            budget_keeper = build("budget", runtime)
            await tg.start(budget_keeper.run)
            stack.callback(budget_keeper.stop)
        for name in providers if providers is not None else [p.name for p in config.providers]:
            actor = ProviderActor(runtime, provider=name, **(provider_options or {}))
            dep.providers[name] = actor
            await tg.start(actor.run)
            stack.callback(actor.stop)
        if router:
            reserve = {"reserve": keeper, **(router_options or {})}
            dep.router = RouterActor(runtime, **reserve)
            await tg.start(dep.router.run)
            stack.callback(dep.router.stop)
            await wait_until_served(caller, "vapora.complete")
            await wait_until_served(caller, "vapora.stream")
        yield dep


async def wait_until_served(nc: nats.NATS, subject: str) -> None:
    """Until a request on ``subject`` from this connection gets an answer (any answer)."""
    with anyio.fail_after(10):
        while True:
            try:
                await nc.request(subject, b"{}", timeout=2)
                return
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.02)


async def until(predicate: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds; fail after ``within_s`` seconds."""
    with anyio.fail_after(within_s):
        while not predicate():  # noqa: ASYNC110 - state changed by other tasks, no event to wait on
            await anyio.sleep(0.01)
