"""Micro-benchmark of ActorService's per-request path, in process (not a test).

A message is handed to ``ActorService._receive`` as the connection's reader would, its task runs
to the end (decode, handler, encode, reply) and the reply goes to a fake ``publish`` that records
it. The same loop with a bare task that only publishes is the baseline; the difference is what
the runtime adds per request, without sockets or a server, so A/B runs are comparable on a noisy
machine; the time taken is the thread's CPU time, so that time spent descheduled by other work
on the machine does not count. Run: ``python -m bench.micro_runtime`` (``--traced`` with a
tracer provider).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

import anyio
import msgspec

from actors import tracing
from actors.service import ActorService, Endpoint, RequestContext
from events import CompletionRequest
from vapora.eventloop import run as run_loop

PAYLOAD = b'{"task_type": "CodeGeneration", "prompt": "Write a function that adds two numbers."}'
SUBJECT = b"bench.runtime"
REPLY = b"_INBOX.abcdefghijklmnopqrstuv.1"


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    chars: int


async def handle(request: CompletionRequest, context: RequestContext) -> Ack:
    return Ack(task_id=request.task_id or "t", chars=len(request.prompt or ""))


class FakeNats:
    """Just enough of a connection for ``ActorService.run``; like nats-py's, ``publish`` returns
    without suspending. Keeps the raw handler the service subscribes and counts replies."""

    def __init__(self) -> None:
        self.replies = 0
        self.raw: Any = None
        self._nuid = SimpleNamespace(next=lambda: b"micro")

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None
    ) -> None:
        self.replies += 1

    async def subscribe(self, subject: str, **kwargs: Any) -> Any:
        async def unsubscribe() -> None:
            pass

        return SimpleNamespace(unsubscribe=unsubscribe, drain=unsubscribe)

    async def subscribe_raw(self, subject: str, handler: Any, *, queue: str = "") -> Any:
        self.raw = handler
        return await self.subscribe(subject)

    async def flush(self, timeout: float = 0) -> None:  # noqa: ASYNC109 - nats-py's signature
        pass


async def runtime_loop(n: int) -> float:
    nc = FakeNats()
    endpoint = Endpoint(
        name="runtime", subject="bench.runtime", request_type=CompletionRequest, handler=handle
    )
    actor = ActorService(nc, name="bench", endpoints=[endpoint])  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        receive = nc.raw
        start = time.thread_time_ns()
        for _ in range(n):
            receive(SUBJECT, REPLY, PAYLOAD, None)
            await asyncio.sleep(0)
        elapsed = time.thread_time_ns() - start
        await asyncio.sleep(0)
        assert nc.replies == n and actor.in_flight == 0, (nc.replies, actor.in_flight)
        actor.stop()
    return elapsed / n / 1000


async def bare_loop(n: int) -> float:
    nc = FakeNats()
    loop = asyncio.get_running_loop()

    async def echo(reply: str, data: bytes) -> None:
        await nc.publish(reply, data)

    tasks = set()
    start = time.thread_time_ns()
    for _ in range(n):
        task = loop.create_task(echo(REPLY.decode(), PAYLOAD))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(0)
    elapsed = time.thread_time_ns() - start
    assert nc.replies == n
    return elapsed / n / 1000


async def main(n: int, rounds: int) -> None:
    await runtime_loop(n)  # warm up
    await bare_loop(n)
    runtime, bare = [], []
    for _ in range(rounds):
        runtime.append(await runtime_loop(n))
        bare.append(await bare_loop(n))
    added = [r - b for r, b in zip(runtime, bare, strict=True)]
    print(
        f"runtime {statistics.median(runtime):.2f} µs  bare {statistics.median(bare):.2f} µs  "
        f"added {statistics.median(added):.2f} µs (min {min(added):.2f})  per request"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--traced", action="store_true")
    args = parser.parse_args()
    if args.traced:
        from opentelemetry.sdk.trace import TracerProvider

        tracing.use(TracerProvider())
    run_loop(main, args.n, args.rounds)
