"""Provider-client benchmark (issue 3): our client's overhead per call over a raw httpx request.

The simulator runs in its own OS process (``python -m vapora.simulator --port 0``). For each
provider, in one run and interleaved over several trials on one keep-alive connection:

* ``floor``: ``httpx.AsyncClient.post`` (httpx's default transport) of the same, pre-encoded
  request body to the same path, reading the whole answer (streams: iterating its bytes) and
  nothing else;
* ``floor_ka``: the same raw httpx calls on :class:`vapora.providers.KeepAliveTransport`, the
  transport our clients use by default;
* ``ours``: ``ProviderClient.complete`` / iterating ``ProviderClient.stream`` to its
  ``completion`` (body building, JSON decode, usage mapping, cost, time limits, latency
  estimate), as built by ``make_client`` (so on ``KeepAliveTransport``);
* ``ours_httpx``: the same client given httpx's default transport, the issue's own measure
  (our client's work over a raw httpx request, both on httpx's transport);
* the peer: the provider's official SDK doing the same call (text and usage), for context.

The runners alternate call by call (rotating their order, with the garbage collector off
during a trial, as ``timeit`` does); each trial takes the median time per call of each, and the
figures are ratios to the floor taken inside each trial (``ours_httpx / floor - 1``: target
under 10 %), in wall-clock time and in the client process's CPU time, as the median (and
range) over trials. Run: ``python -m bench.bench_providers`` (``--quick`` for a smaller run).
Writes ``bench/results/providers.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anthropic
import anyio
import httpx
import msgspec
import ollama
import openai
from google import genai
from google.genai import types as genai_types

from bench.common import machine, spread, write_result
from events.contract import Price
from vapora.providers import KeepAliveTransport, ProviderClient, ProviderRequest, make_client

KINDS = ("anthropic", "openai", "gemini", "ollama")
MODELS = {
    "anthropic": "claude-sonnet-4-6",
    "openai": "gpt-4o",
    "gemini": "gemini-2.5-flash",
    "ollama": "llama3.2",
}
KEY = "sk-bench-0123456789"
REQUEST = ProviderRequest(
    prompt="Write a function that adds two numbers and explain it in one short paragraph.",
    system="You are a careful senior engineer.",
    max_tokens=256,
)
PRICE = Price(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
    source="bench",
    version="1",
)


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "vapora.simulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("simulator ready "):
        process.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    return process, line.removeprefix("simulator ready ")


class Pair:
    """Our client and the raw httpx floor for one provider, talking to the same simulator."""

    def __init__(self, kind: str, base: str) -> None:
        url = base + "/v1" if kind == "openai" else base
        self.client: ProviderClient = make_client(
            name=kind, kind=kind, model=MODELS[kind], price=PRICE, api_key=KEY, base_url=url
        )
        self.client_httpx: ProviderClient = make_client(
            name=kind,
            kind=kind,
            model=MODELS[kind],
            price=PRICE,
            api_key=KEY,
            base_url=url,
            transport=httpx.AsyncHTTPTransport(retries=0),
        )
        # The same bytes our client would send, encoded once: the floor does no work of ours.
        self.raw = httpx.AsyncClient(base_url=url, headers=self.client._http.headers)
        self.raw_ka = httpx.AsyncClient(
            base_url=url, headers=self.client._http.headers, transport=KeepAliveTransport()
        )
        self.paths = {s: self.client._path(REQUEST, MODELS[kind], stream=s) for s in (False, True)}
        self.bodies = {
            s: msgspec.json.encode(self.client._body(REQUEST, MODELS[kind], s))
            for s in (False, True)
        }

    async def floor(self, stream: bool) -> None:
        await self._raw(self.raw, stream)

    async def floor_ka(self, stream: bool) -> None:
        await self._raw(self.raw_ka, stream)

    async def _raw(self, raw: httpx.AsyncClient, stream: bool) -> None:
        headers = {"content-type": "application/json"}
        if not stream:
            response = await raw.post(
                self.paths[False], content=self.bodies[False], headers=headers
            )
            response.read()
            return
        request = raw.build_request(
            "POST", self.paths[True], content=self.bodies[True], headers=headers
        )
        response = await raw.send(request, stream=True)
        async for _ in response.aiter_bytes():
            pass
        await response.aclose()

    async def ours(self, stream: bool) -> None:
        await _call(self.client, stream)

    async def ours_httpx(self, stream: bool) -> None:
        await _call(self.client_httpx, stream)

    async def aclose(self) -> None:
        for client in (self.client, self.client_httpx):
            await client.aclose()
        for raw in (self.raw, self.raw_ka):
            await raw.aclose()


async def _call(client: ProviderClient, stream: bool) -> None:
    if not stream:
        await client.complete(REQUEST)
        return
    async with client.stream(REQUEST) as chunks:
        async for _ in chunks:
            pass
    assert chunks.completion is not None


class Peer:
    """The official SDK making the same call: text and usage, plain or streamed."""

    def __init__(self, kind: str, base: str) -> None:
        self.kind = kind
        self.model = MODELS[kind]
        if kind == "anthropic":
            self.sdk: Any = anthropic.AsyncAnthropic(api_key=KEY, base_url=base, max_retries=0)
        elif kind == "openai":
            self.sdk = openai.AsyncOpenAI(api_key=KEY, base_url=base + "/v1", max_retries=0)
        elif kind == "gemini":
            options = genai_types.HttpOptions(base_url=base, api_version="v1beta")
            self.sdk = genai.Client(api_key=KEY, http_options=options)
        else:
            self.sdk = ollama.AsyncClient(host=base)

    async def call(self, stream: bool) -> None:
        await getattr(self, f"_{self.kind}")(stream)

    async def _anthropic(self, stream: bool) -> None:
        args = {
            "model": self.model,
            "max_tokens": 256,
            "system": REQUEST.system,
            "messages": [{"role": "user", "content": REQUEST.prompt}],
        }
        if stream:
            async for _ in await self.sdk.messages.create(**args, stream=True):
                pass
        else:
            await self.sdk.messages.create(**args)

    async def _openai(self, stream: bool) -> None:
        messages = [
            {"role": "system", "content": REQUEST.system},
            {"role": "user", "content": REQUEST.prompt},
        ]
        if stream:
            chunks = await self.sdk.chat.completions.create(
                model=self.model,
                messages=messages,
                max_completion_tokens=256,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for _ in chunks:
                pass
        else:
            await self.sdk.chat.completions.create(
                model=self.model, messages=messages, max_completion_tokens=256
            )

    async def _gemini(self, stream: bool) -> None:
        config = genai_types.GenerateContentConfig(
            system_instruction=REQUEST.system, max_output_tokens=256
        )
        models = self.sdk.aio.models
        if stream:
            async for _ in await models.generate_content_stream(
                model=self.model, contents=REQUEST.prompt, config=config
            ):
                pass
        else:
            await models.generate_content(model=self.model, contents=REQUEST.prompt, config=config)

    async def _ollama(self, stream: bool) -> None:
        args = {
            "model": self.model,
            "prompt": REQUEST.prompt,
            "system": REQUEST.system,
            "options": {"num_predict": 256},
        }
        if stream:
            async for _ in await self.sdk.generate(**args, stream=True):
                pass
        else:
            await self.sdk.generate(**args)

    async def aclose(self) -> None:
        if self.kind == "gemini":
            await self.sdk.aio.aclose()
        else:
            await self.sdk.close()


async def timed(call: Any, stream: bool) -> tuple[float, float]:
    """Wall-clock and client-CPU microseconds of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    await call(stream)
    return (time.perf_counter() - wall) * 1e6, (time.process_time() - cpu) * 1e6


async def trial(
    runners: dict[str, Any], stream: bool, calls: int
) -> dict[str, tuple[float, float]]:
    """Median wall and CPU time per call of each runner, the runners alternating call by call
    so that drift in the machine's load hits them alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    order = list(runners)
    for i in range(calls):
        turn = i % len(order)
        for name in order[turn:] + order[:turn]:  # rotate: no runner always follows another
            samples[name].append(await timed(runners[name], stream))
    return {
        name: (statistics.median(w for w, _ in got), statistics.median(c for _, c in got))
        for name, got in samples.items()
    }


async def measure(base: str, calls: int, trials: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in KINDS:
        pair, peer = Pair(kind, base), Peer(kind, base)
        for stream in (False, True):
            runners = {
                "floor": pair.floor,
                "floor_ka": pair.floor_ka,
                "ours": pair.ours,
                "ours_httpx": pair.ours_httpx,
                "sdk": peer.call,
            }
            await trial(runners, stream, max(calls // 5, 20))  # warm every path and connection
            runs = []
            for _ in range(trials):
                gc.collect()
                gc.disable()  # as timeit does: a collection lands on whichever call runs then
                try:
                    runs.append(await trial(runners, stream, calls))
                finally:
                    gc.enable()
            results[f"{kind}/{'stream' if stream else 'complete'}"] = summarize(runs)
        await pair.aclose()
        await peer.aclose()
    return results


def summarize(runs: list[dict[str, tuple[float, float]]]) -> dict[str, Any]:
    def ratio(name: str, index: int, floor: str = "floor") -> dict[str, float]:
        return spread([run[name][index] / run[floor][index] - 1 for run in runs])

    return {
        **{f"{name}_us": spread([run[name][0] for run in runs]) for name in runs[0]},
        **{f"{name}_cpu_us": spread([run[name][1] for run in runs]) for name in runs[0]},
        # The measure: our client over raw httpx, both on httpx's transport.
        "overhead_wall": ratio("ours_httpx", 0),
        "overhead_cpu": ratio("ours_httpx", 1),
        # Our client over raw httpx, both on KeepAliveTransport.
        "overhead_ka_wall": ratio("ours", 0, "floor_ka"),
        "overhead_ka_cpu": ratio("ours", 1, "floor_ka"),
        # What a caller sees: our client as shipped over raw httpx as shipped.
        "shipped_wall": ratio("ours", 0),
        "shipped_cpu": ratio("ours", 1),
        "sdk_overhead_wall": ratio("sdk", 0),
    }


def print_table(results: dict[str, Any]) -> None:
    columns = ("floor", "floor_ka", "ours_httpx", "ours", "sdk")
    ratios = ("overhead_wall", "overhead_cpu", "overhead_ka_wall", "overhead_ka_cpu")
    ratios += ("shipped_wall", "shipped_cpu", "sdk_overhead_wall")
    print(
        f"{'provider/mode':<19}"
        + "".join(f"{name + ' us':>14}" for name in columns)
        + "".join(f"{name:>18}" for name in ratios)
    )
    for name, row in results.items():
        print(
            f"{name:<19}"
            + "".join(f"{row[f'{column}_us']['median']:>14.0f}" for column in columns)
            + "".join(f"{row[ratio]['median'] * 100:>17.1f}%" for ratio in ratios)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per trial")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="100 calls x 3 trials")
    args = parser.parse_args(argv)
    calls, trials = (100, 3) if args.quick else (args.calls, args.trials)
    process, base = start_simulator()
    try:
        results = anyio.run(measure, base, calls, trials)
    finally:
        process.terminate()
        process.wait(timeout=10)
    print_table(results)
    path = write_result(
        "providers",
        {
            "at": datetime.now(UTC).isoformat(),
            "calls_per_trial": calls,
            "trials": trials,
            "machine": machine(),
            "results": results,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
