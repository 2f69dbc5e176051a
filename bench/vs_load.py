"""Load generators shared by every leg of ``bench_vs_litellm`` (standard library only).

This module is imported both by the harness (vapora's virtualenv) and by the LiteLLM worker, which
runs in its own virtualenv, so it must not import anything but the standard library.

A *call* is an ``async () -> bool`` that sends one request and says whether it succeeded; a raised
exception counts as a failure. Every generator is bounded in count and in time, and returns a
:class:`Run` of latencies (milliseconds) and counts.

* :func:`closed_loop`: ``concurrency`` workers, each sending its next request when the last one
  finished, until ``requests`` were sent or ``seconds`` passed (completions/s and latency).
* :func:`open_loop`: requests arrive at a fixed rate whether or not earlier ones finished; latency
  runs from the *scheduled* arrival, so a generator that falls behind cannot hide queueing
  (no coordinated omission).
* :func:`sustainable_rate`: :func:`open_loop` at a rate stepped up geometrically until the p99
  exceeds a limit or a request fails; the answer is the last rate that held.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

Call = Callable[[], Awaitable[bool]]

__all__ = [
    "Call",
    "Run",
    "closed_loop",
    "loop_name",
    "open_loop",
    "percentile",
    "run_main",
    "sustainable_rate",
]


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank (same rule as ``bench.common``)."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Run:
    """What one load run saw: latencies of the successful requests (ms), failures, wall time."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0
    seconds: float = 0.0
    late: int = 0  # open loop: requests still unanswered when the run's time was up

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict[str, Any]:
        """Counts, completions/s and latency percentiles, as plain numbers."""
        lat = self.latencies_ms
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "late": self.late,
            "seconds": self.seconds,
            "per_s": self.ok / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(lat, 50),
            "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99),
            "p999_ms": percentile(lat, 99.9),
            "max_ms": max(lat) if lat else float("nan"),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _timed(call: Call, run: Run, start: float) -> None:
    try:
        ok = await call()
    except Exception:
        ok = False
    if ok:
        run.latencies_ms.append((time.perf_counter() - start) * 1000)
    else:
        run.errors += 1


async def closed_loop(call: Call, *, concurrency: int, requests: int, seconds: float) -> Run:
    """``concurrency`` workers send back to back until ``requests`` or ``seconds`` is reached."""
    run = Run()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while run.sent < requests and time.perf_counter() < deadline:
            run.sent += 1
            await _timed(call, run, time.perf_counter())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - began
    return run


async def open_loop(
    call: Call, *, rate: float, seconds: float, drain_s: float = 5.0, max_in_flight: int = 4096
) -> Run:
    """Requests at ``rate`` per second for ``seconds``; then wait up to ``drain_s`` for the rest.

    An arrival that finds ``max_in_flight`` requests outstanding is counted as a failure instead
    of being sent (the system under test is already lost at that point).
    """
    run = Run()
    pending: set[asyncio.Task[None]] = set()
    began = time.perf_counter()
    total = max(1, round(rate * seconds))
    for i in range(total):
        scheduled = began + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        run.sent += 1
        if len(pending) >= max_in_flight:
            run.errors += 1
            continue
        task = asyncio.ensure_future(_timed(call, run, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, late = await asyncio.wait(pending, timeout=drain_s)
        for task in late:
            task.cancel()
        run.late = len(late)
        run.errors += len(late)
        if late:
            await asyncio.wait(late, timeout=1)
    run.seconds = time.perf_counter() - began
    return run


async def sustainable_rate(
    call: Call,
    *,
    start: float,
    factor: float,
    step_seconds: float,
    p99_limit_ms: float,
    max_rate: float,
    relaxed_p99_ms: float | None = None,
    min_samples: int = 100,
    max_step_seconds: float = 6.0,
    max_steps: int = 30,
) -> dict[str, Any]:
    """Step the open-loop rate up by ``factor`` from ``start`` until a step's p99 exceeds
    ``p99_limit_ms`` or a request fails: ``rate`` is the last rate that held.

    With ``relaxed_p99_ms`` the ladder goes on past that point until the p99 exceeds the relaxed
    limit (or a request fails): ``capacity`` is the last rate that held it.

    A step lasts ``step_seconds``, longer at low rates so that it has ``min_samples`` requests
    (at most ``max_step_seconds``). A failed step is run once more before a ladder ends: on a
    shared machine one stall of another process should not decide the figure.
    """
    steps: list[dict[str, Any]] = []
    limits = [p99_limit_ms] if relaxed_p99_ms is None else [p99_limit_ms, relaxed_p99_ms]
    held = [0.0] * len(limits)
    level, rate = 0, start
    for _ in range(max_steps):
        if rate > max_rate or level == len(limits):
            break
        seconds = min(max(step_seconds, min_samples / rate), max_step_seconds)
        p99 = await _step(call, rate, seconds, steps)
        while level < len(limits) and p99 > limits[level]:
            p99 = await _step(call, rate, seconds, steps)  # the retry
            if p99 > limits[level]:
                level += 1
        for i in range(level, len(limits)):
            held[i] = rate
        rate *= factor
    return {"rate": held[0], "capacity": held[-1], "steps": steps}


async def _step(call: Call, rate: float, seconds: float, steps: list[dict[str, Any]]) -> float:
    """One step; answers its p99 (infinite when a request failed)."""
    run = await open_loop(call, rate=rate, seconds=seconds, drain_s=2.0)
    s = run.summary()
    p99 = math.inf if run.errors or not run.ok else s["p99_ms"]
    steps.append(
        {
            "rate": rate,
            "sent": run.sent,
            "p50_ms": s["p50_ms"],
            "p99_ms": s["p99_ms"],
            "errors": run.errors,
        }
    )
    await asyncio.sleep(0.2)  # let the step's stragglers and timers settle
    return p99


T = TypeVar("T")


def loop_name(variable: str = "VAPORA_EVENT_LOOP") -> str:
    """The event loop a process of the benchmark runs on: uvloop where it is installed (as
    vapora's own processes do, see ``vapora/eventloop.py``), unless ``variable`` (by default
    ``VAPORA_EVENT_LOOP``, which vapora's processes read too) says ``asyncio``."""
    if os.environ.get(variable, "").strip().lower() == "asyncio":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run_main(main: Awaitable[T], variable: str = "VAPORA_EVENT_LOOP") -> T:
    """``asyncio.run(main)`` on :func:`loop_name`'s loop."""
    if loop_name(variable) == "uvloop":
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]
