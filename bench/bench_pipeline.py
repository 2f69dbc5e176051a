"""Through-vapora vs direct-to-simulator: added latency at concurrency 1, throughput at 64.

::

    .venv/bin/python bench/bench_pipeline.py [--requests N] [--concurrency C] [--provider P]
                                             [--warmup N]
                                             [--keeper [--lease-cents N]] [--reply-first]
                                             [--profile FILE] [--sequential-only]

One run starts: the provider simulator as its own OS process (``python -m vapora.simulator``,
zero latency), an embedded nats-server with JetStream, and every actor in this process (provider
actors and the router; with ``--keeper`` the budget keeper and cost ledger too, so paid calls
reserve first). Every event is appended as in production. It measures:

* **direct**: the provider client straight to the simulator, concurrency 1, on the transport the
  provider actor itself uses (:func:`vapora.providers.base.default_transport`,
  ``KeepAliveTransport``): the floor. The same client on httpx's own transport is measured beside
  it, for reference (what a caller's own httpx pays; before 2026-11-27 it was the floor, which
  hid the ~0.4 ms by which vapora's transport is faster inside "added by vapora");
* **vapora**: ``vapora.Client.complete`` over NATS, through router and provider actor, concurrency
  1: the added p50 and p99 over the floor are vapora's cost per request;
* **throughput**: completions per second at concurrency ``C`` (default 64), through vapora and
  on both direct paths;
* **CPU**: this process's CPU time (every thread: the caller, the actors, the HTTP client) per
  request in each phase. nats-server and the simulator run in processes of their own, not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.connection import ConnectOptions, connect  # noqa: E402
from actors.eventlog import EventLog  # noqa: E402
from actors.provider import ProviderActor, ShardedTransport  # noqa: E402
from actors.runner import Runtime, build  # noqa: E402
from actors.server import EmbeddedNats  # noqa: E402
from tests.fault.provider_harness import KEYS, config_text, make_config  # noqa: E402
from vapora.client import Client  # noqa: E402
from vapora.eventloop import run as run_loop  # noqa: E402
from vapora.providers import ProviderClient, ProviderRequest, make_client  # noqa: E402
from vapora.providers.base import default_transport  # noqa: E402

PROMPT = "Summarise the plot of a short story about a lighthouse keeper."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def simulator_process() -> AsyncIterator[str]:  # type: ignore[misc]
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vapora.simulator", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("simulator ready"), line
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> tuple[list[float], float]:
    """Each call's wall time in ms, and this process's CPU µs per call."""
    samples = []
    cpu = time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, (time.process_time() - cpu) / n * 1e6


async def throughput(
    n: int, concurrency: int, call: Callable[[], Awaitable[object]]
) -> tuple[float, float]:
    """Calls per second at ``concurrency``, and this process's CPU µs per call."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    cpu = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


async def run(args: argparse.Namespace) -> None:
    with simulator_process() as base_url, tempfile.TemporaryDirectory() as tmp:
        budget = "[budget]\ndaily_limit_cents = 100000000\n" if args.keeper else ""
        if args.keeper and args.lease_cents is not None:
            budget += f"lease_cents = {args.lease_cents}\n"
        config = make_config(config_text(base_url, budget=budget))
        provider = config.provider(args.provider)
        assert provider is not None
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            nc = await connect(ConnectOptions.from_url(server.url, name="bench-actors"))
            log = EventLog(nc)
            await log.ensure_stream()
            runtime = Runtime(nc=nc, config=config, log=log, data_dir=Path(tmp), env=KEYS)
            kinds = (["ledger", "budget"] if args.keeper else []) + ["provider"] * 4 + ["router"]
            names = [None, None] if args.keeper else []
            names += [p.name for p in config.providers] + [None]
            actors = [build(k, runtime, provider=n) for k, n in zip(kinds, names, strict=True)]
            for actor in actors:
                if isinstance(actor, ProviderActor):
                    actor.durable_reply = not args.reply_first
            caller = await nats.connect(server.url, name="bench-caller")
            client = Client(caller)

            def direct_client(transport: httpx.AsyncBaseTransport) -> ProviderClient:
                return make_client(
                    name="direct",
                    kind=provider.kind.value,
                    model=provider.model,
                    price=provider.price,
                    api_key=KEYS.get(provider.api_key_env or "", None),
                    base_url=provider.base_url,
                    transport=transport,
                )

            # The floor: the provider actor's own transport (as ProviderActor builds it).
            assert provider.base_url is not None
            direct = direct_client(default_transport(provider.base_url, 256))
            # For reference: httpx's own transport (in small pools: httpcore's pool scan).
            direct_httpx = direct_client(ShardedTransport())
            request = ProviderRequest(prompt=PROMPT, max_tokens=256)
            async with anyio.create_task_group() as tg:
                for actor in actors:
                    await tg.start(actor.run)

                async def through() -> object:
                    return await client.complete(
                        prompt=PROMPT, provider=args.provider, max_tokens=256
                    )

                async def straight() -> object:
                    return await direct.complete(request)

                async def straight_httpx() -> object:
                    return await direct_httpx.complete(request)

                for path in (straight, straight_httpx, through):  # warm up every path
                    await timed(args.warmup, path)
                profiler = cProfile.Profile() if args.profile else None
                if profiler:
                    profiler.enable()
                n, c = args.requests, args.concurrency
                if args.sequential_only:  # vapora at concurrency 1 alone (to profile it)
                    samples, cpu = await timed(n, through)
                    phases = None
                else:
                    phases = Phases(
                        base=await timed(n, straight),
                        base_httpx=await timed(n, straight_httpx),
                        via=await timed(n, through),
                        rate=await throughput(n * 2, c, through),
                        rate_direct=await throughput(n * 2, c, straight),
                        rate_httpx=await throughput(n * 2, c, straight_httpx),
                    )
                if profiler:
                    profiler.disable()
                    profiler.dump_stats(args.profile)
                events = await log.last_sequence()
                if phases is None:
                    p50, p99 = percentile(samples, 50), percentile(samples, 99)
                    print(
                        f"through vapora, concurrency 1: p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
                        f"{cpu:,.0f} µs of CPU per request; events in the log: {events}"
                    )
                else:
                    report(args, phases, events)
                for actor in reversed(actors):
                    actor.stop()
            await direct.aclose()
            await direct_httpx.aclose()
            await caller.close()
            await nc.close()


@dataclasses.dataclass
class Phases:
    """Each phase's result: (latencies in ms, CPU µs per call) or (calls/s, CPU µs per call)."""

    base: tuple[list[float], float]
    base_httpx: tuple[list[float], float]
    via: tuple[list[float], float]
    rate: tuple[float, float]
    rate_direct: tuple[float, float]
    rate_httpx: tuple[float, float]


def report(args: argparse.Namespace, phases: Phases, events: int) -> None:
    (base, base_cpu), (httpx_base, httpx_cpu) = phases.base, phases.base_httpx
    via, via_cpu = phases.via
    b50, b99 = percentile(base, 50), percentile(base, 99)
    h50, h99 = percentile(httpx_base, 50), percentile(httpx_base, 99)
    v50, v99 = percentile(via, 50), percentile(via, 99)
    print(f"# bench_pipeline  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  cpus={os.cpu_count()}")
    print(
        f"# provider={args.provider} keeper={args.keeper} lease_cents={args.lease_cents} "
        f"reply_first={args.reply_first} "
        f"requests={args.requests}  load average {os.getloadavg()[0]:.1f}"
    )
    w = 34
    print(f"{'path (concurrency 1)':<{w}}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'CPU µs':>10}")
    rows = [
        ("direct to simulator", base, base_cpu),
        ("direct, httpx transport", httpx_base, httpx_cpu),
        ("through vapora", via, via_cpu),
    ]
    for name, samples, cpu in rows:
        p50, p99, mean = percentile(samples, 50), percentile(samples, 99), statistics.mean(samples)
        print(f"{name:<{w}}{p50:>10.3f}{p99:>10.3f}{mean:>10.3f}{cpu:>10.0f}")
    added_cpu = via_cpu - base_cpu
    print(f"{'added by vapora':<{w}}{v50 - b50:>10.3f}{v99 - b99:>10.3f}{'':>10}{added_cpu:>10.0f}")
    print(f"{'added over httpx transport':<{w}}{v50 - h50:>10.3f}{v99 - h99:>10.3f}")
    c = args.concurrency
    (rate, rate_cpu), (direct, direct_cpu) = phases.rate, phases.rate_direct
    httpx_rate, httpx_rate_cpu = phases.rate_httpx
    print(
        f"completions/s at concurrency {c}: vapora {rate:,.0f}, direct {direct:,.0f} "
        f"(httpx transport {httpx_rate:,.0f}); vapora/direct {rate / direct:.2f}"
    )
    print(
        f"CPU µs per completion at concurrency {c}: vapora {rate_cpu:,.0f}, direct "
        f"{direct_cpu:,.0f} (httpx transport {httpx_rate_cpu:,.0f})"
    )
    print(f"events in the log: {events}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=200, help="calls per path before timing")
    parser.add_argument("--provider", default="openai")
    parser.add_argument("--keeper", action="store_true", help="run the budget keeper and ledger")
    parser.add_argument(
        "--reply-first",
        action="store_true",
        help="provider actors reply without waiting for the log's acknowledgement",
    )
    parser.add_argument(
        "--lease-cents",
        default=None,
        help="with --keeper: [budget] lease_cents (0: a reservation round trip per paid call)",
    )
    parser.add_argument("--profile", default=None, help="write cProfile stats to this file")
    parser.add_argument(
        "--sequential-only",
        action="store_true",
        help="only the calls through vapora at concurrency 1 (no floor, no throughput)",
    )
    run_loop(run, parser.parse_args())


if __name__ == "__main__":
    main()
