"""What telemetry costs when it is off: the switches a task goes through, counted and timed.

::

    .venv/bin/python bench/bench_telemetry_off.py [--requests N] [--burst N]

With ``[telemetry] enabled = false`` (the default) every instrumented place asks
:mod:`vapora.telemetry.state` first and does nothing more. This counts, in place, how often a
completion passes each of those places: it runs ``bench_telemetry.py``'s harness (the simulator,
an embedded nats-server, every actor in this process, vapora's client) in the **off** mode only,
with each entry point wrapped in a counter. Then it times each entry point as it runs when off,
in a loop of its own (the calls as the actors make them), and gives their sum per completion
against the CPU a completion takes in the same run. A piece of code costs several times more in
place than alone (BENCHMARKS.md, telemetry): the figure alone is a floor, and the table gives
it eight times too, the largest factor measured in place for the smallest pieces, as a ceiling.
The attribute reads of ``STATE.metrics`` are not counted (each is one read, ~20 ns).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import actors.tracing as tracing  # noqa: E402
import vapora.client as vapora_client  # noqa: E402
import vapora.telemetry as telemetry  # noqa: E402
from bench import bench_telemetry  # noqa: E402
from bench.common import machine, write_result  # noqa: E402
from vapora.eventloop import run as run_loop  # noqa: E402
from vapora.telemetry import messaging  # noqa: E402

#: The entry points a task passes with telemetry off: (module, attribute, label).
ENTRY_POINTS: list[tuple[Any, str, str]] = [
    (tracing, "enabled", "tracing.enabled()"),
    (tracing, "inject", "tracing.inject()"),
    (tracing, "request_span", "with tracing.request_span(...)"),
    (tracing, "recording", "tracing.recording()"),
    (vapora_client, "request_span", "with request_span(...) (client)"),
    (telemetry, "active", "telemetry.active()"),
]
COUNTS: Counter[str] = Counter()


def _counting(function: Callable[..., Any], label: str) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        COUNTS[label] += 1
        return function(*args, **kwargs)

    return counted


def _alone(label: str, iterations: int) -> float:
    """µs per call of the entry point ``label`` as it runs with telemetry off."""
    calls: dict[str, Callable[[], object]] = {
        "tracing.enabled()": tracing.enabled,
        "tracing.inject()": tracing.inject,
        "tracing.recording()": tracing.recording,
        "telemetry.active()": telemetry.active,
    }

    def request_span() -> None:
        with tracing.request_span("vapora.provider.openai.call") as headers:
            assert headers is None

    def client_span() -> None:
        with messaging.request_span("vapora.complete") as headers:
            assert headers is None

    calls["with tracing.request_span(...)"] = request_span
    calls["with request_span(...) (client)"] = client_span
    call = calls[label]
    call()
    started = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - started) / iterations * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="sequential calls")
    parser.add_argument("--burst", type=int, default=64, help="calls per throughput burst")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200_000, help="loop length, alone")
    args = parser.parse_args(argv)
    sizes = ["--requests", str(args.requests), "--burst", str(args.burst)]
    options = bench_telemetry.parse_args(
        ["--modes", "off", "--trials", "1", *sizes, "--bursts", str(args.bursts)]
    )
    originals = {label: getattr(module, name) for module, name, label in ENTRY_POINTS}
    for module, name, label in ENTRY_POINTS:
        setattr(module, name, _counting(originals[label], label))
    try:
        result = run_loop(bench_telemetry.run, options)
    finally:
        for module, name, label in ENTRY_POINTS:  # the originals, for the loops alone
            setattr(module, name, originals[label])
    # Calls made: the sequential ones, the bursts and the 50 warm-up calls.
    tasks = args.requests + args.burst * args.bursts + 50
    cpu_us = result["modes"]["off"]["cpu_us"][0]
    rows = []
    for _, _, label in ENTRY_POINTS:
        per_task = COUNTS[label] / tasks
        alone = _alone(label, args.iterations)
        rows.append({"entry point": label, "per task": per_task, "us alone": alone})
    total = sum(r["per task"] * r["us alone"] for r in rows)
    lines = [
        f"# bench_telemetry_off  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  cpus={os.cpu_count()}  "
        f"load average {os.getloadavg()[0]:.1f}",
        f"# {tasks} completions with telemetry off; CPU per completion {cpu_us:.0f} us",
        f"{'entry point':<36}{'per task':>10}{'us alone':>10}{'us/task':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['entry point']:<36}{r['per task']:>10.2f}{r['us alone']:>10.3f}"
            f"{r['per task'] * r['us alone']:>10.2f}"
        )
    lines.append(
        f"{'all':<36}{'':>10}{'':>10}{total:>10.2f}  = {total / cpu_us * 100:.2f} % of a "
        f"completion's CPU alone; x8 (in place, at most): {total * 8 / cpu_us * 100:.2f} %"
    )
    print("\n".join(lines))
    write_result(
        "telemetry_off",
        {
            "args": vars(args),
            "machine": machine(),
            "entry_points": rows,
            "us_per_task_alone": total,
            "cpu_us_per_completion": cpu_us,
            "at": str(datetime.now()),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
