"""What telemetry costs: throughput and added latency with it off, traces at 100 %, metrics only.

::

    .venv/bin/python bench/bench_telemetry.py [--requests N] [--concurrency C] [--trials T]
                                              [--provider P] [--quick]

One run starts the provider simulator as its own OS process (zero latency), an embedded
nats-server with JetStream, and every actor in this process: the cost ledger, the budget keeper
(so paid calls reserve first), the four provider actors and the router, as ``vapora up`` runs
them. Telemetry is switched in place between calls (the actors read the switch per message), in
a shuffled order so that no mode always follows another:

* **off**: ``[telemetry] enabled = false`` (the default): no spans, no headers, no metrics;
* **traces 100 %**: traces sampled at 100 % and exported as JSON lines through the SDK's batch
  processor (every span serialised and written), plus metrics;
* **traces 10 %**: the same with ``sample_ratio = 0.1`` (the operator's lever);
* **metrics only**: ``traces = false``; the metrics behind ``/metrics`` (pull reader).

Per mode and trial: the latency of ``--requests`` sequential completions (p50, p99) and the
completions per second at ``--concurrency``. The table gives each mode's median over trials and
its cost against **off** measured in the same run: the throughput lost and the p50 added.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.connection import ConnectOptions, connect  # noqa: E402
from actors.cost_ledger import CostLedger  # noqa: E402
from actors.eventlog import EventLog  # noqa: E402
from actors.runner import Runtime, all_actors  # noqa: E402
from actors.server import EmbeddedNats  # noqa: E402
from bench.bench_pipeline import simulator_process  # noqa: E402
from bench.common import machine, percentile, write_result  # noqa: E402
from tests.fault.provider_harness import KEYS, config_text, make_config  # noqa: E402
from vapora.client import Client  # noqa: E402
from vapora.config import TelemetryConfig  # noqa: E402
from vapora.telemetry import Telemetry, setup  # noqa: E402

PROMPT = "Summarise the plot of a short story about a lighthouse keeper."
MODES = ("off", "traces 100%", "traces 10%", "metrics only")
EXPORTER: Any = "jsonl"  # --exporter none: spans made but not exported (the SDK's share alone)


def telemetry_for(mode: str, spans_file: Path) -> Telemetry:
    if mode == "off":
        return setup(TelemetryConfig(enabled=False), env={})
    if mode == "metrics only":
        config = TelemetryConfig(enabled=True, traces=False, prometheus_port=0)
    else:
        config = TelemetryConfig(
            enabled=True,
            exporter=EXPORTER,
            jsonl_path=str(spans_file),
            sample_ratio=1.0 if mode == "traces 100%" else 0.1,
            prometheus_port=0,
        )
    return setup(config, env={})


Call = Callable[[], Awaitable[object]]


async def one_timed(call: Call) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def burst(n: int, concurrency: int, call: Call, telemetry: Telemetry, settled: Call) -> float:
    """Seconds for ``n`` calls at ``concurrency``, including the export of their spans."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    await settled()
    if telemetry.tracer_provider is not None:
        # The batch exporter writes in a thread; charge its work to this mode's window.
        await anyio.to_thread.run_sync(telemetry.tracer_provider.force_flush)
    return time.perf_counter() - started


async def measure(
    args: argparse.Namespace,
    modes: list[str],
    telemetries: dict[str, Telemetry],
    call: Call,
    settled: Call,
) -> dict[str, dict[str, list[float]]]:
    """Latency: sequential calls, each in a mode drawn from a shuffled, balanced list.
    Throughput: bursts of ``--burst`` calls in shuffled modes, each timed until the cost ledger
    has applied its events and the spans are exported (so no mode pays for the one before);
    medians over trials."""
    results: dict[str, dict[str, list[float]]] = {
        m: {"p50": [], "p99": [], "rate": []} for m in modes
    }
    shuffled = random.Random(7)
    for _ in range(args.trials):
        # A shuffled order, so no mode always follows the same one (each leaves work behind:
        # the ledger's tail, garbage for the collector).
        calls = [m for m in modes for _ in range(args.requests)]
        shuffled.shuffle(calls)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for mode in calls:
            telemetries[mode].activate()
            samples[mode].append(await one_timed(call))
        bursts = [m for m in modes for _ in range(args.bursts)]
        shuffled.shuffle(bursts)
        spent = dict.fromkeys(modes, 0.0)
        for mode in bursts:
            telemetries[mode].activate()
            gc.collect()  # start each burst with no garbage left by the one before
            spent[mode] += await burst(
                args.burst, args.concurrency, call, telemetries[mode], settled
            )
        trial = len(results[modes[0]]["p50"])
        for mode in modes:
            results[mode]["p50"].append(percentile(samples[mode], 50))
            results[mode]["p99"].append(percentile(samples[mode], 99))
            results[mode]["rate"].append(args.bursts * args.burst / spent[mode])
            print(
                f"  trial {trial + 1} {mode:<13} p50 {results[mode]['p50'][-1]:6.2f} ms"
                f"  {results[mode]['rate'][-1]:7.0f}/s",
                file=sys.stderr,
            )
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m for m in MODES if m in args.modes]
    with simulator_process() as base_url, tempfile.TemporaryDirectory() as tmp:
        budget = "[budget]\ndaily_limit_cents = 100000000\n"
        config = make_config(config_text(base_url, budget=budget))
        spans_file = Path(tmp) / "spans.jsonl"
        telemetries = {mode: telemetry_for(mode, spans_file) for mode in modes}
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            nc = await connect(ConnectOptions.from_url(server.url, name="bench-actors"))
            log = EventLog(nc)
            await log.ensure_stream()
            runtime = Runtime(nc=nc, config=config, log=log, data_dir=Path(tmp), env=KEYS)
            actors = all_actors(runtime)
            caller = await nats.connect(server.url, name="bench-caller")
            client = Client(caller)

            async def one() -> object:
                return await client.complete(prompt=PROMPT, provider=args.provider, max_tokens=64)

            [ledger] = [a for a in actors if isinstance(a, CostLedger)]

            async def settled() -> object:
                last = await log.last_sequence()
                while ledger.position < last:  # noqa: ASYNC110 - moved by the ledger's task
                    await anyio.sleep(0.001)
                return None

            profiler = cProfile.Profile() if args.profile else None
            async with anyio.create_task_group() as tg:
                for actor in actors:
                    await tg.start(actor.run)
                for mode in modes:  # warm up every path
                    telemetries[mode].activate()
                    for _ in range(50):
                        await one()
                if profiler is not None:
                    profiler.enable()
                results = await measure(args, modes, telemetries, one, settled)
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(args.profile)
                for actor in reversed(actors):
                    actor.stop()
            for telemetry in telemetries.values():
                telemetry.shutdown()
            spans_written = 0
            if spans_file.exists():
                with spans_file.open("rb") as f:
                    spans_written = sum(1 for _ in f)
            await caller.close()
            await nc.close()
    return {"modes": results, "spans_written": spans_written}


def table(args: argparse.Namespace, result: dict[str, Any]) -> str:
    modes = result["modes"]
    base = modes.get("off") or next(iter(modes.values()))
    off_rate = statistics.median(base["rate"])
    off_p50 = statistics.median(base["p50"])
    lines = [
        f"# bench_telemetry  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  cpus={os.cpu_count()}  "
        f"load average {os.getloadavg()[0]:.1f}",
        f"# provider={args.provider} sequential={args.requests}/mode, bursts={args.bursts}x"
        f"{args.burst} at concurrency {args.concurrency}/mode, trials={args.trials} (medians); "
        f"spans exported: {result['spans_written']}",
        f"{'mode':<15}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'throughput cost':>17}"
        f"{'added p50 ms':>14}",
    ]
    for mode in modes:
        p50 = statistics.median(modes[mode]["p50"])
        p99 = statistics.median(modes[mode]["p99"])
        rate = statistics.median(modes[mode]["rate"])
        cost = (1 - rate / off_rate) * 100
        lines.append(
            f"{mode:<15}{p50:>9.2f}{p99:>9.2f}{rate:>9.0f}{cost:>16.1f}%{p50 - off_p50:>14.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential calls per mode")
    parser.add_argument("--burst", type=int, default=64, help="calls per throughput burst")
    parser.add_argument("--bursts", type=int, default=10, help="bursts per mode and trial")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--provider", default="openai")
    parser.add_argument("--quick", action="store_true", help="a short run (smoke)")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES, help="which modes to run"
    )
    parser.add_argument("--profile", default=None, help="write cProfile stats to this file")
    parser.add_argument("--exporter", default="jsonl", choices=["jsonl", "none"])
    args = parser.parse_args(argv)
    global EXPORTER
    EXPORTER = args.exporter
    if args.quick:
        args.requests, args.bursts, args.trials = 50, 3, 1
    result = anyio.run(run, args)
    print(table(args, result))
    write_result(
        "telemetry", {"args": vars(args), "machine": machine(), **result, "at": str(datetime.now())}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
