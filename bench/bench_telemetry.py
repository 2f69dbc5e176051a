"""What telemetry costs: throughput and added latency with it off, traces at 100 %, metrics only.

::

    .venv/bin/python bench/bench_telemetry.py [--requests N] [--concurrency C] [--trials T]
                                              [--exporter otlp|jsonl|none]
                                              [--export thread|process] [--provider P] [--quick]

One run starts the provider simulator as its own OS process (zero latency), an embedded
nats-server with JetStream, and every actor in this process: the cost ledger, the budget keeper
(so paid calls reserve first), the four provider actors and the router, as ``vapora up`` runs
them. Telemetry is switched in place between calls (the actors read the switch per message), in
a shuffled order so that no mode always follows another:

* **off**: ``[telemetry] enabled = false`` (the default): no spans, no headers, no metrics;
* **traces 100 %**: traces sampled at 100 % and exported through the SDK's batch processor,
  plus metrics. The exporter is what a deployment runs: OTLP over HTTP/protobuf (the default
  here) to a collector, stood in for by a separate process that takes each POST and answers
  200, so vapora pays for encoding and sending every span and the collector's own work is not
  counted (``--export process``: encoded and sent by a child process, whose CPU per completion
  is its own column); or ``--exporter jsonl``, every span written to a JSON-lines file (local
  debugging);
* **traces 10 %**: the same with ``sample_ratio = 0.1`` (the operator's lever);
* **traces 0 %**: the same with ``sample_ratio = 0``: no span is recorded, so what is left is
  what every message pays whether or not its trace is sampled (its trace context made, sent,
  read and made current at each hop) plus the metrics: the share of the cost sampling cannot
  take away;
* **metrics only**: ``traces = false``; the metrics behind ``/metrics`` (pull reader);
* **headers only** (not run unless named in ``--modes``): **metrics only**, plus a constant,
  unsampled ``traceparent`` header on every message the actors and the caller publish, added at
  the connection (no vapora telemetry code runs for it): what carrying a trace context costs on
  the wire alone (header blocks built, sent through nats-server, parsed), the floor under
  **traces 0 %**. Its publishes go through a wrapper that the other modes of the same run pass
  through too (one coroutine call per message, so they pay for it alike).

Per mode and trial: the latency of ``--requests`` sequential completions (p50, p99), the
completions per second at ``--concurrency``, the CPU time this process (every actor, the
exporter's thread) spent per completion in those bursts and, with OTLP, the spans exported per
completion (8 at 100 %: the task's trace). The table gives each mode's median over
trials and its cost against **off** measured in the same run: the throughput lost, the p50
added and the CPU added. The CPU figure is the steadier one on a shared machine: a neighbour's
load stretches wall-clock time, much less the CPU time a completion takes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import nats
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

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
from vapora.eventloop import loop_name  # noqa: E402
from vapora.eventloop import run as run_loop  # noqa: E402
from vapora.telemetry import Telemetry, setup  # noqa: E402
from vapora.telemetry.childexport import ChildSpanExporter  # noqa: E402
from vapora.telemetry.export import SpanBatcher  # noqa: E402

PROMPT = "Summarise the plot of a short story about a lighthouse keeper."
MODES = ("off", "traces 100%", "traces 10%", "traces 0%", "metrics only", "headers only")
DEFAULT_MODES = MODES[:5]
#: The ``headers only`` mode's header (an unsampled context: nothing downstream records it).
CARRIED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
RATIOS = {"traces 100%": 1.0, "traces 10%": 0.1, "traces 0%": 0.0}
EXPORTER: Any = "otlp"  # --exporter none: spans made but not exported (the SDK's share alone)
EXPORT_PROCESS = False  # --export process: OTLP encoded and sent by a child process

# A stand-in for an OpenTelemetry collector: reads each OTLP/HTTP request and answers 200.
COLLECTOR = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@contextmanager
def collector_process() -> Iterator[str]:
    """The collector stand-in as its own OS process; yields its base URL."""
    process = subprocess.Popen([sys.executable, "-c", COLLECTOR], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def telemetry_for(mode: str, spans_file: Path, collector: str | None) -> Telemetry:
    """Every mode that records metrics has the same reader (the pull reader behind
    ``/metrics``), so a traced mode's cost over **metrics only** is what tracing adds."""
    if mode == "off":
        return setup(TelemetryConfig(enabled=False), env={})
    if mode in ("metrics only", "headers only"):
        config = TelemetryConfig(enabled=True, traces=False, prometheus_port=0)
        return setup(config, env={})
    config = TelemetryConfig(
        enabled=True,
        exporter=EXPORTER,
        jsonl_path=str(spans_file),
        otlp_endpoint=collector,
        sample_ratio=RATIOS[mode],
        prometheus_port=0,
        export_process=EXPORT_PROCESS,
    )
    return setup(config, env={"OTEL_METRICS_EXPORTER": "none"})


class _Carrier:
    """Whether the active mode is **headers only** (read by the wrapped publishes)."""

    on = False
    carried = 0  # messages sent with the header (said at the end: the mode did something)


@contextmanager
def carrying_headers(telemetries: dict[str, Telemetry]) -> Iterator[None]:
    """Wrap the publishes of both connection classes (the actors' and nats-py's, the caller's)
    so that, while **headers only** is the active mode, every message carries
    :data:`CARRIED`; every mode's ``activate`` sets the switch. Undone on leaving."""
    import nats.aio.client

    from actors import connection

    classes = (connection.Client, nats.aio.client.Client)
    originals = [cls.__dict__["_send_publish"] for cls in classes]
    for cls in classes:
        original = cls.__dict__["_send_publish"]

        async def send(
            self: Any,
            subject: str,
            reply: str,
            payload: bytes,
            size: int,
            headers: dict[str, Any] | None,
            _original: Any = original,
        ) -> None:
            if _Carrier.on and subject:
                _Carrier.carried += 1
                headers = (
                    {**headers, "traceparent": CARRIED} if headers else {"traceparent": CARRIED}
                )
            await _original(self, subject, reply, payload, size, headers)

        cls._send_publish = send  # type: ignore[method-assign, assignment]

    for mode, telemetry in telemetries.items():
        activate = telemetry.activate

        def switched(
            activate: Callable[[], None] = activate, on: bool = mode == "headers only"
        ) -> None:
            _Carrier.on = on
            activate()

        telemetry.activate = switched  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Carrier.on = False
        for cls, original in zip(classes, originals, strict=True):
            cls._send_publish = original  # type: ignore[method-assign]


class _Collections:
    """Seconds the garbage collector ran (its callbacks time each collection)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


GC = _Collections()


class SpanCount(SpanProcessor):
    """Counts the spans handed to the exporters (the table's "spans exported")."""

    ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1

    @classmethod
    def add_to(cls, telemetry: Telemetry) -> SpanCount:
        counter = cls()
        assert telemetry.tracer_provider is not None
        telemetry.tracer_provider.add_span_processor(counter)
        return counter


def batchers(telemetry: Telemetry) -> list[SpanBatcher]:
    """The span batchers of ``telemetry``'s tracer provider (what exports its spans)."""
    provider = telemetry.tracer_provider
    if provider is None:
        return []
    processors = provider._active_span_processor._span_processors
    return [p for p in processors if isinstance(p, SpanBatcher)]


Call = Callable[[], Awaitable[object]]


async def one_timed(call: Call) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def burst(
    n: int, concurrency: int, call: Call, telemetry: Telemetry, settled: Call
) -> tuple[float, float, float]:
    """Seconds, this process's CPU seconds and the seconds of garbage collection for ``n``
    calls at ``concurrency``, including the export of their spans."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started, cpu, collecting = time.perf_counter(), time.process_time(), GC.seconds
    child_cpu = export_process_cpu(telemetry)
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    await settled()
    if telemetry.tracer_provider is not None:
        # The batch exporter writes in a thread (and the export process sends on); charge
        # their work to this mode's window: the flush returns once the collector has it all.
        await anyio.to_thread.run_sync(telemetry.tracer_provider.force_flush)
    return (
        time.perf_counter() - started,
        time.process_time() - cpu,
        GC.seconds - collecting,
        export_process_cpu(telemetry) - child_cpu,
    )


def export_process_cpu(telemetry: Telemetry) -> float:
    """CPU seconds of ``telemetry``'s span export processes so far, as of their last flush."""
    return sum(
        b.exporter.child_cpu_ns / 1e9
        for b in batchers(telemetry)
        if isinstance(b.exporter, ChildSpanExporter)
    )


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
        m: {
            "p50": [],
            "p99": [],
            "rate": [],
            "cpu_us": [],
            "child_us": [],
            "gc_us": [],
            "spans": [],
        }
        for m in modes
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
        # The sequential calls' tail (the ledger's last events, spans not yet exported) is
        # settled before the bursts: each burst pays for its own calls only.
        await settled()
        for telemetry in telemetries.values():
            if telemetry.tracer_provider is not None:
                await anyio.to_thread.run_sync(telemetry.tracer_provider.force_flush)
        bursts = [m for m in modes for _ in range(args.bursts)]
        shuffled.shuffle(bursts)
        spent = dict.fromkeys(modes, 0.0)
        cpu = dict.fromkeys(modes, 0.0)
        collected = dict.fromkeys(modes, 0.0)
        child = dict.fromkeys(modes, 0.0)
        spans = dict.fromkeys(modes, 0)
        for mode in bursts:
            telemetries[mode].activate()
            gc.collect()  # start each burst with no garbage left by the one before
            exported = sum(b.exported for b in batchers(telemetries[mode]))
            wall, used, gc_s, child_s = await burst(
                args.burst, args.concurrency, call, telemetries[mode], settled
            )
            spans[mode] += sum(b.exported for b in batchers(telemetries[mode])) - exported
            spent[mode] += wall
            cpu[mode] += used
            collected[mode] += gc_s
            child[mode] += child_s
        trial = len(results[modes[0]]["p50"])
        for mode in modes:
            results[mode]["p50"].append(percentile(samples[mode], 50))
            results[mode]["p99"].append(percentile(samples[mode], 99))
            results[mode]["rate"].append(args.bursts * args.burst / spent[mode])
            results[mode]["cpu_us"].append(cpu[mode] / (args.bursts * args.burst) * 1e6)
            results[mode]["gc_us"].append(collected[mode] / (args.bursts * args.burst) * 1e6)
            results[mode]["child_us"].append(child[mode] / (args.bursts * args.burst) * 1e6)
            results[mode]["spans"].append(spans[mode] / (args.bursts * args.burst))
            print(
                f"  trial {trial + 1} {mode:<13} p50 {results[mode]['p50'][-1]:6.2f} ms"
                f"  {results[mode]['rate'][-1]:7.0f}/s  {results[mode]['cpu_us'][-1]:6.0f} us CPU"
                f" ({results[mode]['gc_us'][-1]:4.0f} us in GC)",
                file=sys.stderr,
            )
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m for m in MODES if m in args.modes]
    with (
        simulator_process() as base_url,
        collector_process() as collector,
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as stack,
    ):
        budget = "[budget]\ndaily_limit_cents = 100000000\n"
        config = make_config(config_text(base_url, budget=budget))
        spans_file = Path(tmp) / "spans.jsonl"
        telemetries = {mode: telemetry_for(mode, spans_file, collector) for mode in modes}
        if "headers only" in modes:
            stack.enter_context(carrying_headers(telemetries))
        # The exporter's batcher counts what it exported; a counting processor of the bench's
        # own is added only where nothing exports (it would add its cost to what is measured).
        counted = (
            [SpanCount.add_to(t) for t in telemetries.values() if t.tracer_provider]
            if EXPORTER == "none"
            else []
        )
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
    if EXPORTER == "jsonl":
        spans = spans_written
    elif EXPORTER == "none":
        spans = sum(c.ended for c in counted)
    else:
        spans = sum(b.exported for t in telemetries.values() for b in batchers(t))
    return {"modes": results, "spans_exported": spans, "exporter": EXPORTER}


def _paired_cost(mode: dict[str, list[float]], base: dict[str, list[float]], key: str) -> float:
    """The median over trials of ``mode``'s cost against ``base`` in the same trial, in %:
    the throughput lost (``rate``) or the CPU added (``cpu_us``)."""
    if key == "rate":
        costs = [(1 - m / b) * 100 for m, b in zip(mode[key], base[key], strict=True)]
    else:
        costs = [(m / b - 1) * 100 for m, b in zip(mode[key], base[key], strict=True)]
    return statistics.median(costs)


def table(args: argparse.Namespace, result: dict[str, Any]) -> str:
    modes = result["modes"]
    base = modes.get("off") or next(iter(modes.values()))
    otlp = result["exporter"] == "otlp"  # the batchers count what they exported (per mode)
    off_p50 = statistics.median(base["p50"])
    lines = [
        f"# bench_telemetry  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  cpus={os.cpu_count()}  "
        f"load average {result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end, "
        f"{loop_name()} loop",
        f"# provider={args.provider} sequential={args.requests}/mode, bursts={args.bursts}x"
        f"{args.burst} at concurrency {args.concurrency}/mode, trials={args.trials} (medians; "
        f"costs paired within each trial); exporter {result['exporter']}"
        + (f" from a {args.export}" if result["exporter"] == "otlp" else "")
        + f", spans exported: {result['spans_exported']}",
        f"{'mode':<15}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'throughput cost':>17}"
        f"{'added p50 ms':>14}{'CPU us/req':>12}{'CPU added':>11}{'export proc us':>16}"
        f"{'GC us/req':>11}{'spans/call':>12}",
    ]

    for mode in modes:
        p50 = statistics.median(modes[mode]["p50"])
        p99 = statistics.median(modes[mode]["p99"])
        rate = statistics.median(modes[mode]["rate"])
        cpu = statistics.median(modes[mode]["cpu_us"])
        cost = _paired_cost(modes[mode], base, "rate")
        cpu_cost = _paired_cost(modes[mode], base, "cpu_us")
        lines.append(
            f"{mode:<15}{p50:>9.2f}{p99:>9.2f}{rate:>9.0f}{cost:>16.1f}%{p50 - off_p50:>14.2f}"
            f"{cpu:>12.0f}{cpu_cost:>10.1f}%{statistics.median(modes[mode]['child_us']):>16.0f}"
            f"{statistics.median(modes[mode]['gc_us']):>11.0f}"
            + (f"{statistics.median(modes[mode]['spans']):>12.2f}" if otlp else f"{'-':>12}")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential calls per mode")
    parser.add_argument("--burst", type=int, default=64, help="calls per throughput burst")
    parser.add_argument("--bursts", type=int, default=10, help="bursts per mode and trial")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--provider", default="openai")
    parser.add_argument("--quick", action="store_true", help="a short run (smoke)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(DEFAULT_MODES),
        choices=MODES,
        help="which modes to run",
    )
    parser.add_argument("--profile", default=None, help="write cProfile stats to this file")
    parser.add_argument(
        "--exporter",
        default="otlp",
        choices=["otlp", "jsonl", "none"],
        help="where the traced modes' spans go: OTLP/HTTP to a collector stand-in (default), a "
        "JSON-lines file, or nowhere (the SDK's share alone; not a deployment's cost)",
    )
    parser.add_argument(
        "--export",
        default="thread",
        choices=["process", "thread"],
        help="with OTLP: spans encoded and sent by a thread of the actors' process (the default) "
        "or by a child process (telemetry.export_process = true)",
    )
    args = parser.parse_args(argv)
    global EXPORTER, EXPORT_PROCESS
    EXPORTER = args.exporter
    EXPORT_PROCESS = args.export == "process"
    if args.quick:
        args.requests, args.bursts, args.trials = 50, 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    result = run_loop(run, args)  # the loop vapora runs on (uvloop where installed)
    result["load"] = (load_before, os.getloadavg()[0])
    if "headers only" in args.modes:
        print(f"headers only: {_Carrier.carried} messages carried a traceparent", file=sys.stderr)
    print(table(args, result))
    write_result(
        "telemetry", {"args": vars(args), "machine": machine(), **result, "at": str(datetime.now())}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
