"""The calls each leg of ``bench_vs_litellm`` makes from the harness process: the floor (a direct
httpx call to the simulator, a bare NATS request/reply, a JetStream publish with ack) and vapora
(a raw NATS request to ``vapora.complete`` and ``vapora.stream``, as another service would send
it; DESIGN §3).

``python -m bench.vs_floor --serve URL`` runs the floor's echo responder in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import nats
from nats.aio.client import Client as NATS

from bench.vs_load import Call, run_main

ECHO = "bench.vs.echo"
JS_STREAM = "BENCH_VS_FLOOR"
JS_SUBJECT = "bench.vs.floor.js"
ERROR_HEADER = "Nats-Service-Error-Code"


def chat_body(model: str, prompt: str, max_tokens: int, *, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(body)


class ShardedClient:
    """httpx at its best under concurrency: ``shards`` clients with small pools, each request on
    the least busy one. httpcore's pool scans all its connections on every request and response
    (quadratic in the pool's size), so one client with hundreds of connections measures that scan,
    not the call; vapora's provider actor shards its pool the same way."""

    def __init__(self, base_url: str, *, shards: int = 16, per_shard: int = 16) -> None:
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        headers = {"authorization": "Bearer sk-bench-fake", "content-type": "application/json"}
        self.clients = [
            httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10, headers=headers)
            for _ in range(shards)
        ]
        self.busy = [0] * shards

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        index = self.busy.index(min(self.busy))
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def http_client(base_url: str) -> ShardedClient:
    """The floor's HTTP client."""
    return ShardedClient(base_url)


def http_call(clients: ShardedClient, model: str, prompt: str, max_tokens: int) -> Call:
    body = chat_body(model, prompt, max_tokens)

    async def call() -> bool:
        async with clients.client() as client:
            response = await client.post("/chat/completions", content=body)
        return response.status_code == 200 and bool(
            msgspec.json.decode(response.content)["choices"][0]["message"]["content"]
        )

    return call


def http_stream_call(
    clients: ShardedClient, model: str, prompt: str, max_tokens: int, ttfts: list[float]
) -> Call:
    body = chat_body(model, prompt, max_tokens, stream=True)

    async def call() -> bool:
        start = time.perf_counter()
        first = False
        async with (
            clients.client() as client,
            client.stream("POST", "/chat/completions", content=body) as response,
        ):
            if response.status_code != 200:
                return False
            async for line in response.aiter_lines():
                if not first and line.startswith("data: {") and '"content":"' in line:
                    ttfts.append((time.perf_counter() - start) * 1000)
                    first = True
        return first

    return call


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per concurrent
    request, Content-Length bodies only. Not a fair floor for a Python router (which needs a real
    client): it shows what the simulator itself can answer, so that a slow client is seen as such.
    """

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def call(self, model: str, prompt: str, max_tokens: int) -> Call:
        body = chat_body(model, prompt, max_tokens)
        head = [
            "POST /v1/chat/completions HTTP/1.1",
            f"host: {self.host}",
            "authorization: Bearer sk-bench-fake",
            "content-type: application/json",
            f"content-length: {len(body)}",
        ]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

        async def call() -> bool:
            if self.idle:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in status_and_headers.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            payload = await reader.readexactly(length)
            self.idle.append((reader, writer))
            return status_and_headers.startswith(b"HTTP/1.1 200") and b'"content"' in payload

        return call

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def nats_call(nc: NATS, payload: bytes) -> Call:
    async def call() -> bool:
        await nc.request(ECHO, payload, timeout=10)
        return True

    return call


def jetstream_call(nc: NATS, payload: bytes) -> Call:
    """A publish with ack and a ``Nats-Msg-Id``, as vapora's event log appends."""
    js = nc.jetstream()
    prefix = uuid.uuid4().hex[:12]
    counter = itertools.count()

    async def call() -> bool:
        msg_id = f"{prefix}-{next(counter)}"
        await js.publish(JS_SUBJECT, payload, timeout=10, headers={"Nats-Msg-Id": msg_id})
        return True

    return call


async def ensure_floor_stream(nc: NATS) -> None:
    from nats.js.api import StorageType, StreamConfig

    await nc.jetstream().add_stream(
        StreamConfig(name=JS_STREAM, subjects=[JS_SUBJECT], storage=StorageType.FILE)
    )


def vapora_request(prompt: str, task_type: str, max_tokens: int) -> bytes:
    return msgspec.json.encode({"prompt": prompt, "task_type": task_type, "max_tokens": max_tokens})


def vapora_call(nc: NATS, payload: bytes) -> Call:
    """One ``vapora.complete`` request; a service-error reply counts as a failure."""

    async def call() -> bool:
        msg = await nc.request("vapora.complete", payload, timeout=10)
        return not (msg.headers and ERROR_HEADER in msg.headers)

    return call


class StreamInbox:
    """One wildcard inbox for every ``vapora.stream`` request of a run; replies are routed to
    each request's queue by the last token of the reply subject."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = f"_INBOX.bench{uuid.uuid4().hex[:10]}"
        self.queues: dict[str, asyncio.Queue[Any]] = {}
        self.ids = itertools.count()

    async def start(self) -> StreamInbox:
        async def route(msg: Any) -> None:
            queue = self.queues.get(msg.subject.rsplit(".", 1)[-1])
            if queue is not None:
                queue.put_nowait(msg)

        self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=route)
        return self

    def call(self, payload: bytes, ttfts: list[float]) -> Call:
        async def call() -> bool:
            token = str(next(self.ids))
            queue: asyncio.Queue[Any] = asyncio.Queue()
            self.queues[token] = queue
            start = time.perf_counter()
            try:
                await self.nc.publish("vapora.stream", payload, reply=f"{self.prefix}.{token}")
                return await asyncio.wait_for(self._follow(queue, start, ttfts), 10)
            finally:
                del self.queues[token]

        return call

    @staticmethod
    async def _follow(queue: asyncio.Queue[Any], start: float, ttfts: list[float]) -> bool:
        first = False
        while True:
            msg = await queue.get()
            if msg.headers and ERROR_HEADER in msg.headers:
                return False
            kind = msgspec.json.decode(msg.data).get("type")
            if kind == "chunk" and not first:
                ttfts.append((time.perf_counter() - start) * 1000)
                first = True
            elif kind == "end":
                return first
            elif kind != "chunk":
                return False


async def serve(url: str) -> None:
    """The echo responder: replies with the request's payload."""
    nc = await nats.connect(url, name="bench-vs-echo")

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(ECHO, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="the floor's NATS echo responder")
    parser.add_argument("--serve", metavar="URL", required=True)
    run_main(serve(parser.parse_args().serve))


if __name__ == "__main__":
    main()
