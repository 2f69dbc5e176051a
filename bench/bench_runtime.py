"""Foundation benchmark (issue 2): what the actor runtime and the event log cost.

In one run, against one embedded nats-server, interleaved over several trials:

* the floor: a bare NATS request/reply round trip (a plain nats-py subscriber that echoes);
* the runtime's round trip: the same request to an ``ActorService`` endpoint (micro service,
  typed decode, a task per message, trace context, encoded reply);
* pipelined appends per second (``EventLog.append_many``, batches of 1,000);
* replay events per second over 1,000,000 events (``EventLog.replay``, decoded to events).

The responders run in a separate OS process, as actors do. Run: ``python -m bench.bench_runtime``
(``--quick`` for a smaller run). Writes ``bench/results/runtime.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec

from actors.connection import Client, ConnectOptions, connect
from actors.eventlog import EventLog, StreamSettings
from actors.server import EmbeddedNats
from actors.service import ActorService, Endpoint, RequestContext
from bench.common import machine, percentile, spread, write_result
from events import BudgetReleased, CompletionRequest
from vapora.eventloop import run as run_loop

BARE = "bench.bare"
RUNTIME = "bench.runtime"
PAYLOAD = b'{"task_type": "CodeGeneration", "prompt": "Write a function that adds two numbers."}'


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    chars: int


async def handle(request: CompletionRequest, context: RequestContext) -> Ack:
    return Ack(task_id=request.task_id or "t", chars=len(request.prompt or ""))


async def serve(url: str) -> None:
    """The responder process: a bare echo subscriber and a runtime endpoint."""
    nc = await connect(ConnectOptions.from_url(url, name="bench-responder"))

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(BARE, cb=echo)
    service = ActorService(
        nc,
        name="bench",
        endpoints=[
            Endpoint(
                name="runtime", subject=RUNTIME, request_type=CompletionRequest, handler=handle
            )
        ],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        print("ready", flush=True)
        await anyio.sleep_forever()


async def round_trips(nc: Client, subject: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await nc.request(subject, PAYLOAD, timeout=5)
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def released(n: int, at: datetime) -> BudgetReleased:
    return BudgetReleased(
        id=uuid.uuid4().hex, at=at, task_id=f"task-{n}", reservation_id=f"r-{n}", reason="settled"
    )


async def appends_per_second(log: EventLog, n: int) -> float:
    at = datetime.now(UTC)
    events = [released(i, at) for i in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 1000):
        await log.append_many(events[i : i + 1000])
    return n / (time.perf_counter() - start)


async def replay_per_second(log: EventLog) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    async for batch in log.replay(1):
        count += len(batch)
    return count / (time.perf_counter() - start), count


async def fill(log: EventLog, total: int) -> None:
    at = datetime.now(UTC)
    have = await log.last_sequence()
    for i in range(have, total, 5000):
        await log.append_many([released(j, at) for j in range(i, min(total, i + 5000))])


async def run(trials: int, round_trip_n: int, append_n: int, replay_n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp)) as server:
            responder = subprocess.Popen(
                [sys.executable, "-m", "bench.bench_runtime", "--serve", server.url],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert (
                    responder.stdout is not None and responder.stdout.readline().strip() == "ready"
                )
                return await _measure(server, trials, round_trip_n, append_n, replay_n)
            finally:
                responder.terminate()
                responder.wait()


async def _measure(
    server: EmbeddedNats, trials: int, round_trip_n: int, append_n: int, replay_n: int
) -> dict[str, Any]:
    nc = await connect(ConnectOptions.from_url(server.url, name="bench-client"))
    replay_log = EventLog(nc, StreamSettings(name="BENCH_REPLAY", prefix="bench.replay"))
    await replay_log.ensure_stream()
    await fill(replay_log, replay_n)
    await round_trips(nc, BARE, 500)  # warm up both paths
    await round_trips(nc, RUNTIME, 500)
    per_trial: list[dict[str, float]] = []
    for trial in range(trials):
        bare = await round_trips(nc, BARE, round_trip_n)
        runtime = await round_trips(nc, RUNTIME, round_trip_n)
        append_log = EventLog(
            nc, StreamSettings(name=f"BENCH_APPEND_{trial}", prefix=f"bench.a{trial}")
        )
        await append_log.ensure_stream()
        appends = await appends_per_second(append_log, append_n)
        replay, count = await replay_per_second(replay_log)
        assert count == replay_n, f"replayed {count} of {replay_n}"
        per_trial.append(
            {
                "bare_p50_us": percentile(bare, 50),
                "bare_p99_us": percentile(bare, 99),
                "runtime_p50_us": percentile(runtime, 50),
                "runtime_p99_us": percentile(runtime, 99),
                "runtime_over_bare_p50": percentile(runtime, 50) / percentile(bare, 50),
                "appends_per_s": appends,
                "replay_events_per_s": replay,
            }
        )
        print(
            f"trial {trial + 1}/{trials}: "
            + ", ".join(f"{k}={v:,.2f}" for k, v in per_trial[-1].items()),
            flush=True,
        )
    await nc.close()
    summary = {key: spread([t[key] for t in per_trial]) for key in per_trial[0]}
    return {
        "trials": per_trial,
        "summary": summary,
        "replay_events": replay_n,
        "sync_interval": server.sync_interval,
    }


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    rows = [
        ("bare NATS request/reply p50 (floor)", "bare_p50_us", "µs"),
        ("bare NATS request/reply p99", "bare_p99_us", "µs"),
        ("runtime request/reply p50", "runtime_p50_us", "µs"),
        ("runtime request/reply p99", "runtime_p99_us", "µs"),
        ("runtime / bare (p50), per trial", "runtime_over_bare_p50", "ratio"),
        ("pipelined appends", "appends_per_s", "events/s"),
        (f"replay of {result['replay_events']:,} events", "replay_events_per_s", "events/s"),
    ]
    lines = ["| measure | median | min | max | unit |", "|---|---:|---:|---:|---|"]
    for label, key, unit in rows:
        v = s[key]
        fmt = "{:,.3f}" if unit == "ratio" else "{:,.0f}"
        figures = " | ".join(fmt.format(v[k]) for k in ("median", "min", "max"))
        lines.append(f"| {label} | {figures} | {unit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a small run (100k-event replay)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    if args.serve:
        run_loop(serve, args.serve)
        return
    sizes = (3, 2000, 20_000, 100_000) if args.quick else (args.trials, 5000, 100_000, 1_000_000)
    result = run_loop(run, *sizes)
    result["machine"] = machine()
    result["command"] = "python -m bench.bench_runtime" + (" --quick" if args.quick else "")
    path = write_result("runtime", result)
    print(table(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
