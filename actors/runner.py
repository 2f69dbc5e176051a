"""Composing actors: what each actor is given (:class:`Runtime`), how one is built by name, and
how a group of them runs and stops together (``vapora up`` and ``vapora actor``).

Every actor class has the same shape::

    class SomeActor:
        def __init__(self, runtime: Runtime, *, provider: str | None = None) -> None: ...
        name: str                        # e.g. "router", "provider-claude"
        async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None: ...
            # rebuild state, start serving, call task_status.started(), serve until stop()
        def stop(self) -> None: ...       # stop taking work, drain, return from run()
        stop_timeout_s: float            # optional: how long a stop may take (default 30 s)

A stop (the first SIGTERM or SIGINT) stops the actors in reverse start order, each given its
``stop_timeout_s`` to drain. A second signal during that stops hard: every actor's ``run`` is
cancelled, which cuts what is in flight the way a drain deadline does (a provider actor records
each cut call as ``cancelled`` and keeps events the log did not take on disk), instead of the
process dying with nothing recorded.
"""

from __future__ import annotations

import importlib
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import anyio

from actors.connection import Client
from actors.eventlog import EventLog
from vapora.config import Config
from vapora.errors import ConfigError

log = logging.getLogger("vapora.runner")

#: How long an actor is given to stop when it does not say (``stop_timeout_s``).
DEFAULT_STOP_TIMEOUT_S = 30.0

__all__ = ["ACTOR_KINDS", "Actor", "Runtime", "build", "run_until_signalled", "utc_now"]

ACTOR_KINDS: Mapping[str, str] = {
    "router": "actors.router:RouterActor",
    "provider": "actors.provider:ProviderActor",
    "budget": "actors.budget_keeper:BudgetKeeper",
    "ledger": "actors.cost_ledger:CostLedger",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """What every actor is given: its connection, the config, the event log, where to keep
    files, the environment (API keys are read from it, never stored) and a clock."""

    nc: Client
    config: Config
    log: EventLog
    data_dir: Path
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    clock: Callable[[], datetime] = utc_now


class Actor(Protocol):
    name: str

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...

    def stop(self) -> None: ...


def build(kind: str, runtime: Runtime, *, provider: str | None = None) -> Actor:
    """Build the actor called ``kind`` (``router``, ``provider``, ``budget`` or ``ledger``)."""
    try:
        module_name, class_name = ACTOR_KINDS[kind].split(":")
    except KeyError:
        raise ConfigError(
            f"unknown actor {kind!r}; choose one of {', '.join(ACTOR_KINDS)}"
        ) from None
    if kind == "provider":
        if provider is None:
            raise ConfigError("`vapora actor provider` needs --provider NAME")
        if runtime.config.provider(provider) is None:
            names = ", ".join(p.name for p in runtime.config.providers)
            raise ConfigError(f"unknown provider {provider!r}; configured: {names}")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    actor: Actor = cls(runtime, provider=provider) if kind == "provider" else cls(runtime)
    return actor


def all_actors(runtime: Runtime) -> list[Actor]:
    """Every actor of a deployment, in start order: the money side first, the router last."""
    actors = [build("ledger", runtime), build("budget", runtime)]
    actors += [build("provider", runtime, provider=p.name) for p in runtime.config.providers]
    actors.append(build("router", runtime))
    return actors


async def run_until_signalled(
    actors: Sequence[Actor],
    *,
    on_ready: Callable[[], None] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start ``actors`` in order, call ``on_ready``, run until SIGTERM/SIGINT (or cancellation),
    then stop them in reverse order so that in-flight tasks drain before their dependencies go."""
    finished = [anyio.Event() for _ in actors]
    async with anyio.create_task_group() as tg:
        for actor, done in zip(actors, finished, strict=True):
            await tg.start(run_one, actor, done)
        if on_ready is not None:
            on_ready()
        task_status.started()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "%s: stopping (requests in flight drain; a second signal stops hard)",
                    signal.Signals(signum).name,
                )
                break
            started = time.monotonic()
            async with anyio.create_task_group() as stopping:
                stopping.start_soon(_stop_in_order, actors, finished, stopping.cancel_scope)
                async for signum in signals:  # a second signal while draining: stop hard
                    log.warning(
                        "%s during the stop: stopping hard (calls in flight are cut and "
                        "recorded as cancelled)",
                        signal.Signals(signum).name,
                    )
                    stopping.cancel_scope.cancel()
            log.info("stopped in %.1f s", time.monotonic() - started)
        tg.cancel_scope.cancel()


async def _stop_in_order(
    actors: Sequence[Actor], finished: Sequence[anyio.Event], stopping: anyio.CancelScope
) -> None:
    await stop_in_order(actors, finished)
    stopping.cancel()  # every actor stopped: stop listening for a second signal


async def stop_in_order(actors: Sequence[Actor], finished: Sequence[anyio.Event]) -> None:
    """Stop ``actors`` last first, each within its own ``stop_timeout_s`` (``finished``: set when
    each one's run has returned, as :func:`run_one` sets it): the router before the provider
    actors, whose last events the ledger, stopped last, then applies."""
    for actor, done in zip(reversed(actors), reversed(finished), strict=True):
        actor.stop()
        within = getattr(actor, "stop_timeout_s", DEFAULT_STOP_TIMEOUT_S)
        with anyio.move_on_after(within):
            await done.wait()
        if not done.is_set():
            log.warning(
                "%s did not stop within %g s; it is cancelled with the rest", actor.name, within
            )


async def run_one(
    actor: Actor, done: anyio.Event, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Run ``actor``, setting ``done`` when its run returns (for :func:`stop_in_order`)."""
    try:
        await actor.run(task_status=task_status)
    finally:
        done.set()
