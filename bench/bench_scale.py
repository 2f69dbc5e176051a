"""Scaling out on a cluster: requests/s through vapora with one router and one provider actor
per provider, against two of each, all as separate ``vapora actor`` processes on a local 3-node
JetStream cluster (R3 event stream), the provider simulator in its own process.

    .venv/bin/python -m bench.bench_scale [--seconds 10] [--concurrency 64] [--trials 2]

Prints requests/s for both layouts and the CPU each process used during the measured window (so
the figure says what limited it), and writes ``bench/results/scale.json``. Not a test: nothing
here asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from actors.cluster import LocalCluster, free_ports
from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog
from bench.common import machine, write_result
from tests.cluster.processes import VAPORA, ActorProcess, start_actor
from tests.fault.provider_harness import config_text
from vapora.client import Client
from vapora.errors import VaporaError
from vapora.eventloop import run as run_loop

# The model carries the simulator's behaviour: 20 ms to answer, like a fast cached endpoint, so
# the actors (not the simulated provider) are what is measured.
MODELS = {"gemini": "gemini-2.0-flash-slow-20", "ollama": "llama2-slow-20"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Layout:
    name: str
    routers: int
    per_provider: int
    actors: list[ActorProcess] = field(default_factory=list)


@contextlib.asynccontextmanager
async def simulator(tmp: Path) -> AsyncIterator[tuple[str, int]]:
    [port] = free_ports(1)
    process = subprocess.Popen(
        [VAPORA, "simulate", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "simulator.log").open("wb"),
    )
    try:
        await anyio.sleep(1.5)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait()


# paid: GeneralQuery goes to gemini, a paid provider, so each request first reserves its cost with
# the budget keeper (one fenced append, R3) and settles it. free: the zero-cost provider, no
# reservation, so routers and provider actors are what is measured.
WORKLOADS: dict[str, dict[str, str]] = {
    "paid": {"task_type": "GeneralQuery"},
    "free": {"task_type": "GeneralQuery", "provider": "ollama"},
}


async def measure(
    layout: Layout, workload: str, seconds: float, concurrency: int
) -> dict[str, Any]:
    """One trial on a fresh cluster: warm up, then count answers for ``seconds``."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        async with LocalCluster(tmp / "cluster") as cluster, simulator(tmp) as (base_url, sim):
            config = tmp / "vapora.toml"
            budget = "[budget]\ndaily_limit_cents = 100000000\nmonthly_limit_cents = 1000000000\n"
            config.write_text(config_text(base_url, models=MODELS, budget=budget))
            nc = await connect(ConnectOptions.from_url(cluster.url, name="bench"))
            await EventLog(nc).ensure_stream()
            try:
                return await _measure_on(
                    layout, workload, cluster, config, tmp, nc, seconds, concurrency, sim
                )
            finally:
                for actor in layout.actors:
                    await actor.stop()
                layout.actors.clear()
                await nc.close()


async def _measure_on(
    layout: Layout,
    workload: str,
    cluster: LocalCluster,
    config: Path,
    tmp: Path,
    nc: Any,
    seconds: float,
    concurrency: int,
    simulator_pid: int,
) -> dict[str, Any]:
    def start(kind: str, provider: str | None = None) -> None:
        name = (
            f"{kind}-{provider}-{len(layout.actors)}"
            if provider
            else f"{kind}-{len(layout.actors)}"
        )
        layout.actors.append(
            start_actor(
                kind,
                url=cluster.url,
                config_file=config,
                data_dir=tmp / "data" / name,
                log_dir=tmp / "logs",
                provider=provider,
            )
        )

    start("ledger")
    start("budget")
    for provider in MODELS:
        for _ in range(layout.per_provider):
            start("provider", provider)
    for _ in range(layout.routers):
        start("router")
    async with anyio.create_task_group() as tg:
        for actor in layout.actors:
            tg.start_soon(actor.wait_ready)
    client = Client(nc, timeout_s=30)
    answered, errors = 0, 0
    measuring = False
    stop = anyio.Event()

    async def caller(i: int) -> None:
        nonlocal answered, errors
        for n in range(1_000_000):
            if stop.is_set():
                return
            try:
                await client.complete(prompt=f"q {i}-{n}", **WORKLOADS[workload])
                answered += measuring
            except VaporaError:
                errors += measuring

    pids = {
        f"{a.kind}{'-' + a.provider if a.provider else ''}#{i}": a.process.pid
        for i, a in enumerate(layout.actors)
    }
    pids.update({f"nats-{i + 1}": node.pid for i, node in enumerate(cluster.nodes) if node.pid})
    pids["bench client"] = os.getpid()
    pids["simulator"] = simulator_pid
    async with anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(caller, i)
        await anyio.sleep(2.0)  # warm up: connections, caches, JIT-free but page-cache warm
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        measuring = True
        await anyio.sleep(seconds)
        measuring = False
        elapsed = time.monotonic() - started
        cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in pids.items()}
        stop.set()
    return {
        "requests_per_s": answered / elapsed,
        "errors": errors,
        "cpu_cores_used": {name: round(share, 2) for name, share in sorted(cpu.items())},
        "cpu_cores_total": round(sum(cpu.values()), 2),
        # The whole machine's load (other work included): contention shows here.
        "load_average_1m": os.getloadavg()[0],
    }


async def main(args: argparse.Namespace) -> None:
    layouts = [Layout("one of each", 1, 1), Layout("two of each", 2, 2)]
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args), "workloads": {}}
    for workload in args.workloads:
        runs: dict[str, list[dict[str, Any]]] = {}
        for trial in range(args.trials):
            for layout in layouts:
                figure = await measure(layout, workload, args.seconds, args.concurrency)
                runs.setdefault(layout.name, []).append(figure)
                print(
                    f"{workload} trial {trial + 1} {layout.name:12s} "
                    f"{figure['requests_per_s']:8.1f} requests/s ({figure['errors']} errors), "
                    f"CPU cores used {figure['cpu_cores_total']}, "
                    f"machine load {figure['load_average_1m']:.1f}",
                    flush=True,
                )
        medians = {n: statistics.median(t["requests_per_s"] for t in ts) for n, ts in runs.items()}
        ratio = medians["two of each"] / medians["one of each"]
        results["workloads"][workload] = {"trials": runs, "median": medians, "ratio": ratio}
        print(f"{workload}: median requests/s {medians}; two of each / one of each = {ratio:.2f}")
        for name, trials in runs.items():
            print(f"  CPU by process, {name} (last trial):")
            for process, share in trials[-1]["cpu_cores_used"].items():
                print(f"    {process:24s} {share:5.2f} cores")
    print(f"wrote {write_result('scale', results)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=["free", "paid"], choices=WORKLOADS)
    run_loop(main, parser.parse_args())
    sys.exit(0)
