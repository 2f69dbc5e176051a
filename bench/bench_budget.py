"""Budget benchmark (issue 5): replaying the log into budget state, and restarting the keeper.

In one run, against one embedded nats-server:

* a log of N events (default 1,000,000): calls of ``budget_reserved`` + ``spend_recorded``
  (settling it), one in ten released instead, spread over 90 days of event time;
* replay into budget state: ``EventLog.replay`` (transport and decoding included) folded with
  ``vapora.budget.Fold`` (as the keeper's catch-up does), events/s, in one pass that times the
  fold apart, so the same run also gives the two floors: the replay alone (transport + decode)
  and the fold alone;
* restart-to-ready of the budget keeper in a fresh child process (``BudgetKeeper.run`` until
  ``task_status.started()``), without a snapshot (the whole log) and with the snapshot the first
  child wrote when it stopped; and the child's memory (RSS growth from before the keeper starts
  to ready, and the peak), also for a log a tenth as long with the same events per day, to show
  whether memory grows with the log's length.

Run: ``python -m bench.bench_budget`` (``--events 200000`` for a quick run). Prints a table and
writes ``bench/results/budget.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog, StreamSettings
from actors.server import EmbeddedNats
from bench.common import machine, write_result
from events.contract import Price, TaskType
from events.log import BudgetReleased, BudgetReserved, Event, SpendRecorded
from vapora import budget
from vapora.budget_view import decode_views

PRICE = Price(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.30"),
    cache_write_per_mtok=Decimal("3.75"),
    source="bench",
    version="1",
)
START = datetime(2026, 6, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
CHUNK = 2000
TAIL = 10_000  # events appended after the keeper's snapshot, before the warm restart


def call_events(n: int, at: datetime) -> list[Event]:
    """The events of call ``n`` at ``at``: a reservation, then its spend or its release."""
    rid, task = f"r{n}", f"t{n}"
    reserved = BudgetReserved(
        id=f"{rid}a",
        at=at,
        task_id=task,
        reservation_id=rid,
        provider="claude",
        amount_usd=Decimal("0.0450"),
        expires_at=at + timedelta(minutes=2),
    )
    if n % 10 == 9:
        closed: Event = BudgetReleased(
            id=f"{rid}b", at=at, task_id=task, reservation_id=rid, reason="failed"
        )
    else:
        closed = SpendRecorded(
            id=f"{rid}b",
            at=at + timedelta(seconds=1),
            task_id=task,
            task_type=TaskType.CODE_GENERATION,
            provider="claude",
            model="claude-opus-4-5",
            input_tokens=1200 + n % 500,
            output_tokens=300 + n % 200,
            cost_usd=Decimal(1200 + n % 500) * 3 / 1_000_000
            + Decimal(300 + n % 200) * 15 / 1_000_000,
            price=PRICE,
            reservation_id=rid,
        )
    return [reserved, closed]


async def fill(
    log: EventLog, events: int, span: timedelta, *, first: int = 0, start: datetime = START
) -> float:
    """Append ``events`` events (pipelined) spread over ``span`` from ``start``, calls numbered
    from ``first``; returns appends per second."""
    calls = events // 2
    started = time.perf_counter()
    pending: list[Event] = []
    for n in range(calls):
        pending += call_events(first + n, start + span * n / calls)
        if len(pending) >= CHUNK:
            await log.append_many(pending)
            pending = []
    if pending:
        await log.append_many(pending)
    return events / (time.perf_counter() - started)


async def replay_into_state(log: EventLog) -> dict[str, Any]:
    """One pass: the log replayed and folded as the keeper's restart does it (each event decoded
    into the view of the fields the fold reads, ``vapora/budget_view.py``; each batch folded as
    read), timing the fold apart from the replay."""
    folding = 0.0
    started = time.perf_counter()
    fold, count = budget.Fold(), 0
    async for batch in log.replay_batches(decode_views, 1):
        mark = time.perf_counter()
        fold.apply_sequenced(batch.seqs, batch.events)
        folding += time.perf_counter() - mark
        count += len(batch)
    mark = time.perf_counter()
    state = fold.state()
    folding += time.perf_counter() - mark
    total = time.perf_counter() - started
    return {
        "count": count,
        "state": state,
        "replay_into_state_per_s": count / total,
        "replay_only_per_s": count / (total - folding),
        "fold_only_per_s": count / folding,
    }


# --- the child: one keeper restart -----------------------------------------------------------


async def child(url: str, data_dir: str, stream: str, prefix: str) -> None:
    """Start a keeper on the log, print how long it took to be ready and the peak RSS."""
    from actors.budget_keeper import BudgetKeeper
    from actors.runner import Runtime
    from vapora.config import default_config

    baseline = _rss_mb("VmRSS")
    nc = await connect(ConnectOptions.from_url(url, name="bench-keeper"))
    log = EventLog(nc, StreamSettings(name=stream, prefix=prefix))
    runtime = Runtime(nc=nc, config=default_config(at=START), log=log, data_dir=Path(data_dir))
    keeper = BudgetKeeper(runtime)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        await tg.start(keeper.run)
        ready_s = time.perf_counter() - started
        after, peak = _rss_mb("VmRSS"), _rss_mb("VmHWM")
        keeper.stop()
    await nc.close()
    print(
        json.dumps(
            {
                "ready_s": ready_s,
                "replayed": keeper.replayed_events,
                "restored_sequence": keeper.restored_sequence,
                "peak_rss_mb": peak,
                "baseline_rss_mb": baseline,
                "grew_mb": after - baseline,
                "open_reservations": len(keeper.state.open_reservations()),
                "total_spent_usd": str(keeper.state.total_spent_usd),
            }
        ),
        flush=True,
    )


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def restart(url: str, data_dir: Path, settings: StreamSettings) -> dict[str, Any]:
    started = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_budget",
            "--child",
            url,
            str(data_dir),
            settings.name,
            settings.prefix,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


# --- the run ---------------------------------------------------------------------------------


async def measure(events: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vapora-bench-budget-") as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as server:
            nc = await connect(ConnectOptions.from_url(server.url, name="bench"))
            big = StreamSettings(name="BENCH_BUDGET", prefix="benchb.events")
            small = StreamSettings(name="BENCH_BUDGET_T", prefix="bencht.events")
            result: dict[str, Any] = {"events": events}
            # The short log has the same events per day over a tenth of the days.
            for settings, n, span in ((big, events, SPAN), (small, events // 10, SPAN / 10)):
                log = EventLog(nc, settings)
                await log.ensure_stream()
                rate = await fill(log, n, span)
                if settings is big:
                    result["append_events_per_s"] = rate
            log = EventLog(nc, big)
            await replay_into_state(EventLog(nc, small))  # warm up the replay path
            replayed = await replay_into_state(log)
            assert replayed["count"] == events, f"replayed {replayed['count']} of {events}"
            state = replayed.pop("state")
            del replayed["count"]
            result.update(replayed)
            for name, settings in (("full", big), ("tenth", small)):
                data_dir = Path(tmp) / f"keeper-{name}"
                cold = await anyio.to_thread.run_sync(restart, server.url, data_dir, settings)
                # The keeper snapshots every 10,000 events: a crash leaves at most that many
                # (plus 30 s worth) to replay. Append that many after its snapshot.
                await fill(
                    EventLog(nc, settings),
                    TAIL,
                    timedelta(hours=1),
                    first=events,
                    start=START + SPAN,
                )
                warm = await anyio.to_thread.run_sync(restart, server.url, data_dir, settings)
                result[f"restart_{name}_no_snapshot"] = cold
                result[f"restart_{name}_snapshot"] = warm
            await nc.close()
            assert result["restart_full_no_snapshot"]["total_spent_usd"] == str(
                state.total_spent_usd
            )
            return result


def table(r: dict[str, Any]) -> str:
    n = r["events"]
    cold, warm = r["restart_full_no_snapshot"], r["restart_full_snapshot"]
    tcold = r["restart_tenth_no_snapshot"]
    rows = [
        (
            f"replay {n:,} events into budget state (decode + fold)",
            r["replay_into_state_per_s"],
            "events/s",
        ),
        ("  of which the replay alone (transport + decode)", r["replay_only_per_s"], "events/s"),
        ("  of which the fold alone (budget.Fold)", r["fold_only_per_s"], "events/s"),
        ("  (filling the log: pipelined appends)", r["append_events_per_s"], "events/s"),
        (f"keeper restart to ready, {n:,} events, no snapshot", cold["ready_s"], "s"),
        (f"keeper restart to ready, {n:,} events, snapshot", warm["ready_s"], "s"),
        ("  same, process start to exit (interpreter, imports, connect)", warm["process_s"], "s"),
        ("  events replayed after the snapshot (appended after it)", warm["replayed"], "events"),
        (f"keeper RSS growth to ready, {n:,} events (90 days), no snapshot", cold["grew_mb"], "MB"),
        (
            f"keeper RSS growth to ready, {n // 10:,} events (9 days), no snapshot",
            tcold["grew_mb"],
            "MB",
        ),
        (f"keeper RSS growth to ready, {n:,} events, snapshot", warm["grew_mb"], "MB"),
        (f"keeper process peak RSS (VmHWM), {n:,} events, no snapshot", cold["peak_rss_mb"], "MB"),
        (
            f"keeper process peak RSS (VmHWM), {n // 10:,} events, no snapshot",
            tcold["peak_rss_mb"],
            "MB",
        ),
        ("  RSS before the keeper starts (interpreter + imports)", cold["baseline_rss_mb"], "MB"),
    ]
    lines = ["| measure | value | unit |", "|---|---:|---|"]
    for label, value, unit in rows:
        text = (
            f"{value:,.3f}" if unit == "s" else f"{value:,.0f}" if unit != "MB" else f"{value:,.1f}"
        )
        lines.append(f"| {label} | {text} | {unit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        anyio.run(child, *args.child)
        return
    result = anyio.run(measure, args.events)
    result["command"] = " ".join(["python -m bench.bench_budget", *sys.argv[1:]])
    result["machine"] = machine()
    write_result("budget", result)
    print(table(result))


if __name__ == "__main__":
    main()
