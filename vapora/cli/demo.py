"""``vapora demo``: the main job on the embedded default, in about a minute, with no API keys.

It starts the embedded nats-server, every actor and the provider simulators (realistic latencies,
token rates and prices), then drives a mixed workload over NATS: all seven task types, several
quality levels, some streams, a few manual overrides, an Anthropic outage partway (its calls fail,
fallback takes over, the breaker opens and later closes), and a daily budget that runs down through
NearThreshold into Exceeded so the routing visibly shifts to cheaper and then free providers.
A live line shows progress. At the end it prints the cost report, the tier changes with their
causes and the fallbacks, writes an HTML report, and runs the audit. The data directory stays, so
``vapora report/events/audit --data-dir DIR`` work on it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import anyio

from actors.connection import Client as NatsClient
from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog
from actors.runner import Actor, Runtime, all_actors, run_one, stop_in_order
from actors.server import EmbeddedNats
from events.codec import event_tag
from events.contract import Tier
from events.log import (
    INSTANCE_STOPPED,
    BudgetReserved,
    BudgetTierChanged,
    Event,
    FallbackTriggered,
    ProviderHealthChanged,
    SpendRecorded,
)
from vapora.client import Client
from vapora.config import Config, load_config
from vapora.errors import ConfigError, VaporaError
from vapora.report_html import render_html
from vapora.simulator import Simulator
from vapora.telemetry.sdk import setup

__all__ = ["Workload", "demo_config_text", "plan_workload", "run_demo"]

MARKER = ".vapora-demo"
SIMULATED_KEYS = {
    "ANTHROPIC_API_KEY": "sim-anthropic-demo-key",
    "OPENAI_API_KEY": "sim-openai-demo-key",
    "GOOGLE_API_KEY": "sim-google-demo-key",
}

_PROMPTS = {
    "CodeGeneration": [
        "Write a Python function that merges overlapping intervals and explain its complexity.",
        "Implement a token-bucket rate limiter in Go with tests.",
        "Write a SQL query for the top five customers by revenue per month in 2026.",
    ],
    "CodeReview": [
        "Review this diff for race conditions: the cache is read outside the lock, then updated.",
        "Review this Rust function for error handling; it unwraps every Result.",
    ],
    "ArchitectureDesign": [
        "Design an event-sourced billing service with exactly-once settlement and audits.",
        "Propose an architecture for multi-region read replicas with bounded staleness.",
    ],
    "Documentation": [
        "Write the README section that explains how budgets and reservations work.",
        "Document the retry policy of our HTTP client for the operations handbook.",
    ],
    "GeneralQuery": [
        "What is the difference between at-least-once and exactly-once delivery?",
        "Summarise the trade-offs of fsync on every write.",
        "Why do circuit breakers have a half-open state?",
    ],
    "Embeddings": ["customer complaint: invoice charged twice", "release notes for version 2.3"],
    "SecurityAnalysis": [
        "Analyse this login handler for timing attacks and missing rate limits.",
        "Assess the risk of storing API keys in environment variables in containers.",
    ],
}
_QUALITIES = ("Low", "Medium", "Medium", "High", "High", "Critical")
_DEMANDING = {"CodeGeneration", "CodeReview", "ArchitectureDesign", "SecurityAnalysis"}


@dataclass(frozen=True)
class Task:
    """One request of the demo's workload."""

    index: int
    fields: dict[str, Any]
    stream: bool


@dataclass
class Workload:
    """What the workload produced, as the caller saw it."""

    total: int
    done: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    spend: Decimal = Decimal(0)
    tier: str = Tier.NORMAL.value
    served: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0
    streams: int = 0


def plan_workload(n: int, seed: int = 7) -> list[Task]:
    """A deterministic, realistic mix: all task types, qualities, ~15 % streams, a few overrides."""
    rng = random.Random(seed)
    tasks = []
    for index in range(n):
        task_type = rng.choice(list(_PROMPTS))
        fields: dict[str, Any] = {
            "task_id": f"demo-{index:04d}",
            "task_type": task_type,
            "prompt": f"{rng.choice(_PROMPTS[task_type])} Context: {_context(rng)}",
            "quality": rng.choice(_QUALITIES[2:] if task_type in _DEMANDING else _QUALITIES),
            "max_tokens": rng.choice((128, 256, 384)),
        }
        if index % 37 == 5:
            fields["provider"] = rng.choice(("gemini", "openai", "ollama"))
        tasks.append(Task(index, fields, stream=rng.random() < 0.15))
    return tasks


def _context(rng: random.Random) -> str:
    words = ("the", "service", "retries", "ledger", "budget", "queue", "latency", "tenant")
    return " ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))


def demo_config_text(simulator_url: str, daily_limit_cents: int) -> str:
    """The demo's TOML with the simulator's URL and the day's budget filled in."""
    template = importlib.resources.files("vapora").joinpath("demo.toml").read_text()
    return template.replace("{simulator}", simulator_url).replace(
        "{daily_limit_cents}", str(daily_limit_cents)
    )


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every step, the audit included, succeeded."""
    if args.real:
        return await _run_real(args)
    data_dir = _fresh_data_dir(Path(args.data_dir))
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(Simulator(port=0))
        config = _write_config(data_dir, demo_config_text(sim.base_url, _daily_cents(args)))
        env = {**os.environ, **SIMULATED_KEYS}
        return await _run(stack, args, data_dir, config, env, sim, plan_workload(args.requests))
    return 1  # pragma: no cover - the stack always returns above


REAL_REQUESTS = 14


async def _run_real(args: argparse.Namespace) -> int:
    """The same workload, small (14 tasks, 64 output tokens each), to the real providers with
    the API keys in the environment: the built-in config (or ``--config``), real base URLs."""
    from vapora.config import ENV_CONFIG, config_path, default_config, missing_api_key

    path = config_path(args.config, os.environ)
    config = (
        default_config(at=datetime.now(UTC))
        if path is None
        else load_config(path, at=datetime.now(UTC))
    )
    paid = [p for p in config.providers if not p.zero_cost]
    if all(missing_api_key(p, os.environ) for p in paid):
        keys = ", ".join(sorted({p.api_key_env or "" for p in paid}))
        raise ConfigError(f"--real needs at least one provider key in the environment: {keys}")
    data_dir = _fresh_data_dir(Path(args.data_dir))
    text = _config_text(path)
    config = _write_config(data_dir, text)
    tasks = [
        Task(t.index, {**t.fields, "max_tokens": 64}, t.stream)
        for t in plan_workload(REAL_REQUESTS)
    ]
    print(
        f"vapora demo --real: {len(tasks)} small tasks to the real providers "
        f"(--config, ${ENV_CONFIG} or the built-in config)"
    )
    async with contextlib.AsyncExitStack() as stack:
        return await _run(stack, args, data_dir, config, dict(os.environ), None, tasks)
    return 1  # pragma: no cover - the stack always returns above


async def _run(
    stack: contextlib.AsyncExitStack,
    args: argparse.Namespace,
    data_dir: Path,
    config: Config,
    env: dict[str, str],
    sim: Simulator | None,
    tasks: list[Task],
) -> int:
    out = sys.stdout
    started = time.monotonic()
    server = await stack.enter_async_context(EmbeddedNats(data_dir / "nats", serving=True))
    nc = await connect(ConnectOptions.from_url(server.url, name="vapora-demo"))
    stack.push_async_callback(nc.close)
    log = EventLog(nc)
    await log.ensure_stream()
    runtime = Runtime(nc=nc, config=config, log=log, data_dir=data_dir, env=env)
    where = f"simulators {sim.base_url}" if sim else "the real providers"
    print(f"vapora demo: nats-server {server.url}, {where}, data in {data_dir}/", file=out)
    _log_to_file(data_dir / "demo.log", verbose=args.verbose)
    stack.callback(setup(config.telemetry, env=os.environ, service_name="vapora-demo").shutdown)
    demo = _Demo(nc=nc, log=log, sim=sim, data_dir=data_dir, out=out, started=started)
    return await _run_with_actors(all_actors(runtime), demo, tasks)


def _log_to_file(path: Path, *, verbose: bool) -> None:
    """Actors log to ``demo.log``; the terminal keeps the progress line and warnings."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    for existing in root.handlers:
        existing.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(handler)


def _fresh_data_dir(path: Path) -> Path:
    """``path`` emptied (a previous demo's) and marked as the demo's. A directory the demo did
    not make, or one a running server uses (``vapora up`` on it, or another demo: its store
    was removed under it), is refused."""
    from actors.server import in_use

    if path.exists():
        if not (path / MARKER).exists():
            raise ConfigError(
                f"{path} exists and is not a vapora demo directory; choose another --data-dir"
            )
        holder = in_use(path / "nats")
        if holder is not None:
            raise ConfigError(
                f"{holder}; the demo empties its data directory first: choose another "
                "--data-dir, or stop that first"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by `vapora demo`; removed by the next run\n")
    return path


def _config_text(path: str | None) -> str:
    if path is None:
        return str(importlib.resources.files("vapora").joinpath("default.toml").read_text())
    return Path(path).read_text()


def _daily_cents(args: argparse.Namespace) -> int:
    # About a third of the way through the workload spend reaches half of the day's budget.
    return max(5, round(int(args.requests) * 0.15))


def _write_config(data_dir: Path, text: str) -> Config:
    path = data_dir / "config.toml"  # later `vapora ... --data-dir` commands read it
    path.write_text(text)
    return load_config(str(path), at=datetime.now(UTC))


@dataclass(frozen=True, kw_only=True)
class _Demo:
    nc: NatsClient
    log: EventLog
    sim: Simulator | None
    data_dir: Path
    out: TextIO
    started: float


async def _run_with_actors(actors: Sequence[Actor], demo: _Demo, tasks: list[Task]) -> int:
    finished = [anyio.Event() for _ in actors]
    async with anyio.create_task_group() as tg:
        for actor, done in zip(actors, finished, strict=True):
            await tg.start(run_one, actor, done)
        try:
            client = Client(demo.nc, timeout_s=30)
            workload = await _drive(client, demo.sim, tasks, demo.out)
            await _settled(client, demo.log)
            code = await _finish(demo, workload)
        finally:
            # As `vapora up` stops: the router first, the ledger last (it applies the others'
            # last events, so the data directory's ledger is at the log's end).
            with anyio.CancelScope(shield=True):
                await stop_in_order(actors, finished)
    return code


async def _settled(client: Client, log: EventLog, wait_s: float = 15.0) -> None:
    """Wait until the ledger has applied every event appended so far (bounded)."""
    last = await log.last_sequence()
    for _ in range(int(wait_s / 0.05)):
        if (await client.report()).last_sequence >= last:
            return
        await anyio.sleep(0.05)


async def _drive(client: Client, sim: Simulator | None, tasks: list[Task], out: TextIO) -> Workload:
    workload = Workload(total=len(tasks))
    outage_at, outage_s = len(tasks) // 10, 3.0
    limiter = anyio.Semaphore(8)
    progress = _Progress(out, workload)
    async with anyio.create_task_group() as tg:
        for task in tasks:
            if task.index == outage_at and sim is not None:
                sim.control(
                    {"provider": "anthropic", "fail_for_s": outage_s, "fail_with": "error-529"}
                )
                progress.note(f"Anthropic outage: every call fails with 529 for {outage_s:g} s")
            await limiter.acquire()
            tg.start_soon(_one, client, task, workload, limiter, progress)
    progress.close()
    return workload


async def _one(
    client: Client, task: Task, workload: Workload, limiter: anyio.Semaphore, progress: _Progress
) -> None:
    try:
        result = await (_streamed(client, task) if task.stream else client.complete(**task.fields))
        workload.spend += result.cost_usd
        workload.tier = result.route.tier.value
        workload.served[result.provider] += 1
        workload.fallbacks += sum(1 for a in result.attempts if a.outcome != "ok")
    except VaporaError as error:
        workload.errors[error.code] += 1
    finally:
        workload.done += 1
        limiter.release()
        progress.update()


async def _streamed(client: Client, task: Task) -> Any:
    stream = client.stream(**task.fields)
    async with stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


class _Progress:
    """One live line on a terminal; a line every 10 % otherwise."""

    def __init__(self, out: TextIO, workload: Workload) -> None:
        self.out, self.workload = out, workload
        self.tty = out.isatty()
        self._last_decile = -1

    def _line(self) -> str:
        w = self.workload
        bar = "#" * (24 * w.done // max(w.total, 1))
        return (
            f"[{bar:<24}] {w.done}/{w.total} requests · {sum(w.errors.values())} errors · "
            f"{w.fallbacks} failed attempts · ${w.spend:.4f} spent · tier {w.tier}"
        )

    def update(self) -> None:
        if self.tty:
            self.out.write("\r" + self._line())
            self.out.flush()
            return
        decile = 10 * self.workload.done // max(self.workload.total, 1)
        if decile != self._last_decile:
            self._last_decile = decile
            print(self._line(), file=self.out, flush=True)

    def note(self, text: str) -> None:
        if self.tty:
            self.out.write("\n")
        print(f"  ! {text}", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            self.out.write("\r" + self._line() + "\n")


# --- the end: report, tier changes, fallbacks, HTML, audit ---------------------------------------


async def _finish(demo: _Demo, workload: Workload) -> int:
    out, data_dir = demo.out, demo.data_dir
    events = [entry.event async for batch in demo.log.replay(1) for entry in batch]
    elapsed = time.monotonic() - demo.started
    print(
        f"\n{workload.done} requests in {elapsed:.1f} s; served by {dict(workload.served)}; "
        f"errors {dict(workload.errors) or 'none'}",
        file=out,
    )
    await _print_report(demo.nc, out)
    _print_tier_changes(events, out)
    _print_fallbacks(events, out)
    html_path = data_dir / "report.html"
    html_path.write_text(render_html(events, title="vapora demo", now=datetime.now(UTC)))
    print(f"\nHTML report: {html_path}", file=out)
    code = await _audit(demo.nc, demo.log, data_dir, out)
    print(
        f"\nThe data stays in {data_dir}/: try `vapora report --data-dir {data_dir}`, "
        f"`vapora events --data-dir {data_dir} --type budget_tier_changed`, "
        f"`vapora audit --data-dir {data_dir}`.",
        file=out,
    )
    return code


async def _print_report(nc: NatsClient, out: TextIO) -> None:
    from vapora.cli.money import report_command

    print("\nCost report (from the ledger):", file=out)
    print(await report_command(nc, since=None, until=None, as_json=False), file=out)


def _print_tier_changes(events: Sequence[Event], out: TextIO) -> None:
    by_id = {e.id: e for e in events}
    changes = [e for e in events if isinstance(e, BudgetTierChanged)]
    print("\nBudget tier changes:", file=out)
    if not changes:
        print("  none", file=out)
    for change in changes:
        cause = by_id.get(change.causation_id or "")
        print(
            f"  {change.at:%H:%M:%S} {change.from_tier.value} -> {change.to_tier.value} "
            f"(daily {change.daily_percent:.1f} %), caused by {_describe(cause)}",
            file=out,
        )


def _describe(event: Event | None) -> str:
    if isinstance(event, SpendRecorded):
        return (
            f"spend_recorded {event.id} ({event.provider}, ${event.cost_usd}, task {event.task_id})"
        )
    if isinstance(event, BudgetReserved):
        return (
            f"budget_reserved {event.id} ({event.provider} hold ${event.amount_usd}, "
            f"task {event.task_id})"
        )
    if event is None:
        return "an event outside this log"
    return f"{event_tag(event)} {event.id}"  # the event's own name, as everywhere else


def _print_fallbacks(events: Sequence[Event], out: TextIO) -> None:
    fallbacks = Counter(
        (e.from_provider, e.to_provider or "-", e.reason.split(":")[0])
        for e in events
        if isinstance(e, FallbackTriggered)
    )
    print("\nFallbacks:", file=out)
    for (source, target, reason), count in fallbacks.most_common():
        print(f"  {count:4d} x {source} -> {target} ({reason})", file=out)
    if not fallbacks:
        print("  none", file=out)
    print("\nProvider health changes:", file=out)
    # Changes only: each provider starts available with its breaker closed; an event that says
    # the same again (its latency estimate moved, a heartbeat) or that an instance stopped (not
    # about the provider) is not one.
    said: dict[str, tuple[bool, str]] = {}
    for e in events:
        if not isinstance(e, ProviderHealthChanged) or e.reason == INSTANCE_STOPPED:
            continue
        now = (e.available, e.breaker)
        if said.get(e.provider, (True, "closed")) == now:
            continue
        said[e.provider] = now
        state = "available" if e.available else "unavailable"
        print(
            f"  {e.at:%H:%M:%S} {e.provider}: {state}, breaker {e.breaker} ({e.reason})",
            file=out,
        )


async def _audit(nc: NatsClient, log: EventLog, data_dir: Path, out: TextIO) -> int:
    from vapora.cli.money import audit_command

    print("\nvapora audit:", file=out)
    code, text = await audit_command(nc, log, data_dir)
    print(text, file=out)
    return code
