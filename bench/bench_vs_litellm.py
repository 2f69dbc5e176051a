"""Head-to-head benchmark (issue 7): vapora against LiteLLM's Router and against the floor, on the
same machine, in one run.

Systems (every one calls the same OpenAI-compatible simulator, in its own process):

* ``floor http``: a direct httpx call to the simulator from the harness (the cost of the call
  itself); ``floor nats``: a bare NATS request/reply to an echo process; ``floor js``: a
  JetStream publish with ack (file storage, ``Nats-Msg-Id``), as vapora's event log appends;
* ``vapora up``: every actor in one process (``vapora up``), every event appended, budgets on,
  driven over NATS by the harness as another service would (raw requests on ``vapora.complete``);
* ``vapora split``: the same with one ``vapora actor`` process per actor;
* ``litellm``: ``litellm.Router`` (pinned in ``bench/litellm-requirements.txt``, installed into
  its own virtualenv ``bench/.venv-litellm``, never a dependency of vapora) with the simulator as
  OpenAI-compatible deployments, a fallback and a provider budget, called in-process by its own
  load generator (a Router is a library: that is how an application uses it).

Scenarios, interleaved per trial (the order of the systems rotates each trial): concurrency 1
(added latency over the direct call), concurrency 64 and 256 (completions/s, latency), the
sustainable open-loop rate against a 50 ms provider (stepped up until p99 > 100 ms or an error),
a provider failing 20 % of calls with fallback on, streaming (added time to first token). CPU
seconds and peak memory of each system's serving processes are read from ``/proc``. Ratios are
taken per trial against the peer and the floor of the same trial; the tables show medians and the
spread over trials.

Run ``python -m bench`` (or ``make bench``); ``--quick`` for a short run. Writes
``bench/results/vs_litellm.json``, prints a Markdown table and updates ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats

from bench import vs_floor, vs_procs
from bench.common import machine, spread, write_result
from bench.vs_load import Call, closed_loop, percentile, run_main, sustainable_rate
from bench.vs_report import markdown, update_benchmarks_md

HERE = Path(__file__).resolve().parent
LITELLM_VENV = HERE / ".venv-litellm"
LITELLM_REQUIREMENTS = HERE / "litellm-requirements.txt"

PROMPT = "Summarise the trade-offs of event sourcing for a billing system in three sentences."
MAX_TOKENS = 64
# The simulator picks behaviour by model name: slow-50 answers after 50 ms, flaky-20 fails every
# fifth call with a 503 (a transient error: both routers fall back).
MODELS = {
    "primary": "gpt-4o-mini",
    "backup": "gpt-4o-mini",
    "slow": "gpt-4o-mini-slow-50",
    "flaky": "gpt-4o-mini-flaky-20",
}
FALLBACKS = {"primary": ["backup"], "flaky": ["backup"]}
# vapora routes by task type: each model group above is a provider, each route a rule.
TASK_TYPES = {"primary": "GeneralQuery", "slow": "Documentation", "flaky": "CodeReview"}

FLOORS = ("floor http", "floor raw http", "floor nats", "floor js")
VAPORA = ("vapora up", "vapora split")
PEER = "litellm"


@dataclass(frozen=True)
class Plan:
    """How much each scenario sends: bounded in count and in time."""

    trials: int = 3
    c1_requests: int = 1000
    c1_seconds: float = 10.0
    closed_requests: int = 20_000
    closed_seconds: float = 2.0
    step_start: float = 25.0
    step_factor: float = 1.5
    step_seconds: float = 1.2
    step_min_samples: int = 50
    step_max_seconds: float = 2.0
    max_rate: float = 1000.0
    flaky_requests: int = 1500
    flaky_seconds: float = 2.5
    flaky_concurrency: int = 16
    stream_requests: int = 200
    stream_seconds: float = 3.0
    warmup: int = 100
    settle_s: float = 0.3  # pause between legs, so one leg's stragglers do not load the next
    split: bool = True
    litellm: bool = True


FULL = Plan()
QUICK = Plan(
    trials=1,
    c1_requests=300,
    c1_seconds=4,
    closed_seconds=1.5,
    step_factor=2.0,
    step_seconds=1.0,
    step_min_samples=30,
    flaky_requests=300,
    flaky_seconds=2,
    stream_requests=100,
    stream_seconds=2,
    warmup=50,
)
SMOKE = Plan(
    trials=1,
    c1_requests=40,
    c1_seconds=2,
    closed_requests=150,
    closed_seconds=1,
    step_start=10,
    step_factor=2.0,
    step_seconds=0.5,
    step_min_samples=5,
    max_rate=40,
    flaky_requests=40,
    flaky_seconds=1,
    flaky_concurrency=4,
    stream_requests=20,
    stream_seconds=1,
    warmup=20,
    settle_s=0.02,
    split=False,
)


# --- the legs -------------------------------------------------------------------------------


class Leg:
    """One system under test: how it answers each scenario, and which processes serve it."""

    name: str
    scenarios: tuple[str, ...] = ("c1", "c64", "c256", "rate", "flaky", "stream")

    def pids(self) -> list[int]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the leg's clients (its processes are stopped by the harness)."""

    async def closed(self, group: str, concurrency: int, requests: int, seconds: float) -> dict:
        return (
            await closed_loop(
                self.call(group), concurrency=concurrency, requests=requests, seconds=seconds
            )
        ).to_dict()

    async def sustainable(self, group: str, **plan: Any) -> dict:
        return await sustainable_rate(self.call(group), **plan)

    async def stream(self, group: str, concurrency: int, requests: int, seconds: float) -> dict:
        ttfts: list[float] = []
        run = await closed_loop(
            self.stream_call(group, ttfts),
            concurrency=concurrency,
            requests=requests,
            seconds=seconds,
        )
        return {**run.to_dict(), "ttft_ms": ttfts}

    def call(self, group: str) -> Call:
        raise NotImplementedError

    def stream_call(self, group: str, ttfts: list[float]) -> Call:
        raise NotImplementedError


class FloorHTTP(Leg):
    name = "floor http"

    def __init__(self, simulator_url: str) -> None:
        self.client = vs_floor.http_client(simulator_url + "/v1")

    def pids(self) -> list[int]:
        return [os.getpid()]  # the client's own cost: there is no server in between

    async def close(self) -> None:
        await self.client.aclose()

    def call(self, group: str) -> Call:
        return vs_floor.http_call(self.client, MODELS[group], PROMPT, MAX_TOKENS)

    def stream_call(self, group: str, ttfts: list[float]) -> Call:
        return vs_floor.http_stream_call(self.client, MODELS[group], PROMPT, MAX_TOKENS, ttfts)


class FloorRawHTTP(Leg):
    name = "floor raw http"
    scenarios = ("c1", "c64", "c256")

    def __init__(self, simulator_url: str) -> None:
        self.client = vs_floor.RawHTTP(simulator_url)

    def pids(self) -> list[int]:
        return [os.getpid()]

    async def close(self) -> None:
        self.client.close()

    def call(self, group: str) -> Call:
        return self.client.call(MODELS[group], PROMPT, MAX_TOKENS)


class FloorNATS(Leg):
    scenarios = ("c1", "c64", "c256")

    def __init__(self, name: str, nc: Any, make: Callable[[Any, bytes], Call], pids: list[int]):
        self.name, self.nc, self.make, self._pids = name, nc, make, pids
        self.payload = vs_floor.vapora_request(PROMPT, "GeneralQuery", MAX_TOKENS)

    def pids(self) -> list[int]:
        return self._pids

    def call(self, group: str) -> Call:
        return self.make(self.nc, self.payload)


class Vapora(Leg):
    def __init__(self, deployment: vs_procs.Deployment, nc: Any, inbox: vs_floor.StreamInbox):
        self.name = deployment.name
        self.deployment, self.nc, self.inbox = deployment, nc, inbox

    def pids(self) -> list[int]:
        return self.deployment.pids()

    def _payload(self, group: str) -> bytes:
        return vs_floor.vapora_request(PROMPT, TASK_TYPES[group], MAX_TOKENS)

    def call(self, group: str) -> Call:
        return vs_floor.vapora_call(self.nc, self._payload(group))

    def stream_call(self, group: str, ttfts: list[float]) -> Call:
        return self.inbox.call(self._payload(group), ttfts)


class LiteLLM(Leg):
    name = PEER

    def __init__(self, worker: vs_procs.LiteLLMWorker) -> None:
        self.worker = worker

    def pids(self) -> list[int]:
        return vs_procs.process_tree(self.worker.pid)

    async def closed(self, group: str, concurrency: int, requests: int, seconds: float) -> dict:
        command = {"op": "closed", "model": group, "concurrency": concurrency}
        return await self.worker.ask(command | {"requests": requests, "seconds": seconds})

    async def sustainable(self, group: str, **plan: Any) -> dict:
        return await self.worker.ask({"op": "sustainable", "model": group, **plan})

    async def stream(self, group: str, concurrency: int, requests: int, seconds: float) -> dict:
        command = {"op": "stream", "model": group, "concurrency": concurrency}
        return await self.worker.ask(command | {"requests": requests, "seconds": seconds})


# --- measuring ------------------------------------------------------------------------------


async def measured(leg: Leg, work: Awaitable[dict]) -> dict[str, Any]:
    """Run ``work`` with the leg's processes metered; add CPU and memory to its answer."""
    cpu0 = time.process_time()
    async with vs_procs.Meter(leg.pids()) as meter:
        answer = await work
    answer["cpu_s"] = meter.cpu_s
    answer["peak_rss_mb"] = meter.peak_rss_mb
    answer["harness_cpu_s"] = time.process_time() - cpu0
    return answer


def figures(answer: dict[str, Any]) -> dict[str, float]:
    """The numbers kept from one closed-loop answer (latencies summarised, not stored)."""
    lat = answer.get("latencies_ms", [])
    ok = len(lat)
    out = {
        "ok": ok,
        "errors": answer.get("errors", 0),
        "per_s": ok / answer["seconds"] if answer.get("seconds") else 0.0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9),
        "cpu_ms_per_req": 1000 * answer["cpu_s"] / max(ok, 1),
        "peak_rss_mb": answer["peak_rss_mb"],
        "success_pct": 100 * ok / max(ok + answer.get("errors", 0), 1),
    }
    if "ttft_ms" in answer:
        out["ttft_p50_ms"] = percentile(answer["ttft_ms"], 50)
        out["ttft_p99_ms"] = percentile(answer["ttft_ms"], 99)
    return out


async def scenario(name: str, leg: Leg, plan: Plan) -> dict[str, Any]:
    if name == "c1":
        work = leg.closed("primary", 1, plan.c1_requests, plan.c1_seconds)
    elif name in ("c64", "c256"):
        work = leg.closed("primary", int(name[1:]), plan.closed_requests, plan.closed_seconds)
    elif name == "flaky":
        work = leg.closed("flaky", plan.flaky_concurrency, plan.flaky_requests, plan.flaky_seconds)
    elif name == "stream":
        work = leg.stream("primary", 1, plan.stream_requests, plan.stream_seconds)
    else:
        steps = {
            "start": plan.step_start,
            "factor": plan.step_factor,
            "step_seconds": plan.step_seconds,
            "p99_limit_ms": 100.0,
            "relaxed_p99_ms": 1000.0,
            "max_rate": plan.max_rate,
            "min_samples": plan.step_min_samples,
            "max_step_seconds": plan.step_max_seconds,
        }
        answer = await measured(leg, leg.sustainable("slow", **steps))
        keep = ("rate", "capacity", "steps", "cpu_s")
        return {key: answer[key] for key in keep}
    return figures(await measured(leg, work))


SCENARIOS = ("c1", "c64", "c256", "rate", "flaky", "stream")


async def trial(index: int, legs: list[Leg], plan: Plan) -> dict[str, dict[str, Any]]:
    """Every scenario for every leg; the legs' order rotates with the trial."""
    shift = index % len(legs)
    order = legs[shift:] + legs[:shift]
    result: dict[str, dict[str, Any]] = {}
    for name in SCENARIOS:
        result[name] = {}
        began = time.monotonic()
        for leg in order:
            if name in leg.scenarios:
                result[name][leg.name] = await scenario(name, leg, plan)
                await asyncio.sleep(plan.settle_s)
        took = time.monotonic() - began
        print(f"  trial {index + 1} {name} ({took:.0f} s): {line(name, result[name])}", flush=True)
    return result


def line(name: str, legs: dict[str, dict[str, Any]]) -> str:
    key = {"c1": "p50_ms", "rate": "rate", "stream": "ttft_p50_ms"}.get(name, "per_s")
    if name == "flaky":
        key = "success_pct"
    return ", ".join(f"{leg} {values.get(key, float('nan')):,.2f}" for leg, values in legs.items())


def ratios(t: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per-trial ratios against the peer (LiteLLM) and the floor (the direct call)."""
    out: dict[str, float] = {}
    floor = t["c1"].get("floor http")
    for system in (*VAPORA, PEER):
        c1 = t["c1"].get(system)
        if c1 and floor:
            for p in ("p50", "p99", "p999"):
                out[f"{system}|c1 added {p} ms"] = c1[f"{p}_ms"] - floor[f"{p}_ms"]
        for c in ("c64", "c256"):
            if system in t[c] and "floor http" in t[c]:
                out[f"{system}|{c} per_s / floor"] = (
                    t[c][system]["per_s"] / t[c]["floor http"]["per_s"]
                )
        if system in t["stream"] and "floor http" in t["stream"]:
            for p in ("p50", "p99"):
                out[f"{system}|stream added ttft {p} ms"] = (
                    t["stream"][system][f"ttft_{p}_ms"] - t["stream"]["floor http"][f"ttft_{p}_ms"]
                )
    for system in VAPORA:
        if system not in t["c1"] or PEER not in t["c1"]:
            continue
        for c in ("c64", "c256"):
            out[f"{system}|{c} per_s vs litellm"] = t[c][system]["per_s"] / t[c][PEER]["per_s"]
            out[f"{system}|{c} litellm cpu / vapora cpu"] = (
                t[c][PEER]["cpu_ms_per_req"] / t[c][system]["cpu_ms_per_req"]
            )
        for p in ("p50", "p99"):
            out[f"{system}|c1 added {p} vs litellm"] = (
                out[f"{system}|c1 added {p} ms"] / out[f"{PEER}|c1 added {p} ms"]
            )
        for key in ("rate", "capacity"):
            peer = t["rate"][PEER][key]
            out[f"{system}|{key} vs litellm"] = (
                t["rate"][system][key] / peer if peer else float("nan")
            )
        out[f"{system}|stream added ttft p50 vs litellm"] = (
            out[f"{system}|stream added ttft p50 ms"] / out[f"{PEER}|stream added ttft p50 ms"]
        )
    return out


def flatten(t: dict[str, dict[str, Any]]) -> dict[str, float]:
    flat = {
        f"{system}|{name} {key}": value
        for name, legs in t.items()
        for system, values in legs.items()
        for key, value in values.items()
        if isinstance(value, int | float)
    }
    return flat | ratios(t)


def summarise(trials: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Median, min and max over the trials of every figure; a ratio that was undefined in a
    trial (its denominator was 0) is left out of that figure, and ``n`` says how many counted."""
    flats = [flatten(t) for t in trials]
    summary = {}
    for key in sorted(set().union(*flats)):
        values = [f[key] for f in flats if key in f and not math.isnan(f[key])]
        nan = float("nan")
        summary[key] = spread(values) if values else {"median": nan, "min": nan, "max": nan}
        summary[key]["n"] = len(values)
    return summary


# --- setting up -----------------------------------------------------------------------------


def vapora_config(simulator_url: str) -> str:
    """All providers on the simulator (OpenAI-compatible), prices given, budgets on."""
    providers = "".join(
        f"""
[[providers]]
name = "{group}"
kind = "openai"
base_url = "{simulator_url}/v1"
api_key_env = "OPENAI_API_KEY"
model = "{model}"
input_price_per_mtok = 0.15
output_price_per_mtok = 0.60
timeout_ms = 10000
rate_limit_rpm = 100000000
"""
        for group, model in MODELS.items()
    )
    rules = "".join(
        f"""
[[routing_rules]]
task_type = "{TASK_TYPES[group]}"
primary_provider = "{group}"
fallback_chain = {FALLBACKS.get(group, [])!r}
""".replace("'", '"')
        for group in TASK_TYPES
    )
    return (
        providers
        + rules
        + """
[budget]
daily_limit_cents = 100000000
monthly_limit_cents = 1000000000
per_task_limit_cents = 1000

[routing]
zero_cost_last_resort = false
"""
    )


def litellm_python(plan: Plan, install: bool) -> Path | None:
    """The interpreter that has LiteLLM: this one, or ``bench/.venv-litellm`` (created from
    ``litellm-requirements.txt`` when ``install``); None when there is none."""
    if not plan.litellm:
        return None
    if importlib.util.find_spec("litellm") is not None:
        return Path(sys.executable)
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists() and install:
        print(f"creating {LITELLM_VENV} with {LITELLM_REQUIREMENTS.name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(LITELLM_REQUIREMENTS)],
            check=True,
        )
    if not python.exists():
        return None
    if install and _lacks(python, "uvloop"):  # a venv made before uvloop joined the requirements
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(LITELLM_REQUIREMENTS)],
            check=True,
        )
    probe = subprocess.run([str(python), "-c", "import litellm"], capture_output=True, check=False)
    return python if probe.returncode == 0 else None


def _lacks(python: Path, module: str) -> bool:
    probe = [str(python), "-c", f"import {module}"]
    return subprocess.run(probe, capture_output=True, check=False).returncode != 0


async def warm(leg: Leg, plan: Plan) -> None:
    """Open connections, fill caches and estimates on every route the leg will take."""
    if plan.warmup:
        await leg.closed("primary", 8, plan.warmup, 10.0)
        if "rate" in leg.scenarios:
            for group in ("flaky", "slow"):
                await leg.closed(group, 8, plan.warmup // 5, 10.0)


async def run(plan: Plan, *, install: bool = True, workdir: Path | None = None) -> dict[str, Any]:
    """Start everything, run the trials, stop everything; answers the result document."""
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vs-")))
        return await _run(plan, tmp, install, began)


async def _run(plan: Plan, tmp: Path, install: bool, began: float) -> dict[str, Any]:
    log = tmp / "processes.log"
    children: list[vs_procs.Child] = []
    deployments: list[vs_procs.Deployment] = []
    connections: list[Any] = []
    worker: vs_procs.LiteLLMWorker | None = None
    floor_nats = vs_procs.EmbeddedNats(tmp / "floor-nats")
    legs: list[Leg] = []
    try:
        sim, sim_url = vs_procs.start_simulator(log)
        children.append(sim)
        config = tmp / "vapora.toml"
        config.write_text(vapora_config(sim_url))
        deployments.append(vs_procs.vapora_up(config, tmp / "up", log))
        if plan.split:
            deployments.append(
                await vs_procs.vapora_split(config, tmp / "split", log, list(MODELS))
            )
        await floor_nats.start()
        children.append(vs_procs.nats_echo(floor_nats.url, log))
        python = litellm_python(plan, install)
        litellm_version = None
        if python is not None:
            worker = vs_procs.LiteLLMWorker(python, log)
            setup = {"op": "setup", "base_url": sim_url + "/v1", "models": MODELS}
            ready = await worker.ask(
                setup | {"fallbacks": FALLBACKS, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
            )
            litellm_version = ready["litellm"]
        legs += [FloorHTTP(sim_url), FloorRawHTTP(sim_url)]
        fnc = await nats.connect(floor_nats.url, name="bench-vs-floor")
        connections.append(fnc)
        await vs_floor.ensure_floor_stream(fnc)
        server = [floor_nats.pid or 0]
        legs.append(FloorNATS("floor nats", fnc, vs_floor.nats_call, [*server, children[-1].pid]))
        legs.append(FloorNATS("floor js", fnc, vs_floor.jetstream_call, server))
        for deployment in deployments:
            nc = await nats.connect(deployment.url, name="bench-vs-client", pending_size=2**26)
            connections.append(nc)
            legs.append(Vapora(deployment, nc, await vs_floor.StreamInbox(nc).start()))
        if worker is not None:
            legs.append(LiteLLM(worker))
        for leg in legs:
            await warm(leg, plan)
        setup_s = time.monotonic() - began
        print(f"set up in {setup_s:.1f} s; legs: {', '.join(leg.name for leg in legs)}", flush=True)
        trials = []
        for index in range(plan.trials):
            trials.append(await trial(index, legs, plan))
        return {
            "plan": asdict(plan),
            "systems": [leg.name for leg in legs],
            "trials": trials,
            "summary": summarise(trials),
            "versions": {"litellm": litellm_version, "vapora": _vapora_version()},
            "setup_s": setup_s,
            "total_s": time.monotonic() - began,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    finally:
        for leg in legs:
            with contextlib.suppress(Exception):
                await leg.close()
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()
        if worker is not None:
            worker.stop()
        for deployment in reversed(deployments):
            await deployment.stop()
        await floor_nats.stop()
        for child in reversed(children):
            child.stop()


def _vapora_version() -> str:
    from vapora import __version__

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    # Uncommitted changes to vapora's own code are part of what was measured: say so.
    changed = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "vapora", "actors", "events"], cwd=HERE.parent
    ).returncode
    dirty = " with uncommitted changes" if changed == 1 else ""
    return f"{__version__} ({commit}{dirty})" if commit else __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short trial (about a minute)")
    parser.add_argument("--trials", type=int, help="override the number of trials")
    parser.add_argument("--no-split", action="store_true", help="skip `vapora actor` processes")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM leg")
    parser.add_argument("--no-install", action="store_true", help="do not create its venv")
    parser.add_argument("--no-update", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.trials:
        plan = replace(plan, trials=args.trials)
    plan = replace(plan, split=plan.split and not args.no_split)
    plan = replace(plan, litellm=plan.litellm and not args.no_litellm)
    result = run_main(run(plan, install=not args.no_install))
    result["machine"] = machine() | {"kernel": platform.release()}
    result["command"] = "make bench  # = python -m bench" + (" --quick" if args.quick else "")
    path = write_result("vs_litellm", result)
    table = markdown(result)
    print(table)
    print(f"wrote {path} in {result['total_s']:.0f} s")
    if not args.no_update:
        print(f"updated {update_benchmarks_md(table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
