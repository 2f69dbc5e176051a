"""Fixtures for the provider clients, pricing and simulator tests: a simulator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import anyio.abc
import pytest

from events.contract import Price
from vapora.providers import ProviderClient, make_client
from vapora.simulator import Simulator

SECRET = "sk-VAPORA-TEST-SECRET-0123456789abcdef"
MODELS = {
    "anthropic": "claude-sonnet-4-6",
    "openai": "gpt-4o",
    "gemini": "gemini-2.5-flash",
    "ollama": "llama3.2",
}
PRICES = {
    "anthropic": ("3", "15", "0.3", "3.75"),
    "openai": ("2.5", "10", "1.25", "2.5"),
    "gemini": ("0.3", "2.5", "0.03", "0.3"),
    "ollama": ("0", "0", "0", "0"),
}


def price_of(kind: str) -> Price:
    inp, out, read, write = (Decimal(p) for p in PRICES[kind])
    return Price(
        input_per_mtok=inp,
        output_per_mtok=out,
        cache_read_per_mtok=read,
        cache_write_per_mtok=write,
        source="test",
        version="1",
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


ClientFactory = Callable[..., ProviderClient]


@pytest.fixture
async def client_for(sim: Simulator) -> AsyncIterator[ClientFactory]:
    """``client_for(kind, model_suffix="", *, model=MODELS[kind], **options)``: a client of
    ``kind`` on the simulator."""
    made: list[ProviderClient] = []

    def build(
        kind: str, suffix: str = "", *, model: str | None = None, **options: Any
    ) -> ProviderClient:
        options.setdefault("api_key", SECRET)
        options.setdefault("timeout", 5.0)
        options.setdefault("base_url", sim.base_url_for(kind))
        client = make_client(
            name=f"{kind}-sim",
            kind=kind,
            model=(model or MODELS[kind]) + (f"-{suffix}" if suffix else ""),
            price=price_of(kind),
            **options,
        )
        made.append(client)
        return client

    yield build
    for client in made:
        await client.aclose()


@asynccontextmanager
async def stub(answer: bytes, hold_s: float = 0.0) -> AsyncIterator[int]:
    """A server on a free port that reads one request and writes ``answer`` (a whole HTTP
    response, as bytes), then closes (after ``hold_s``); yields its port."""

    async def serve(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head, _, rest = request.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += await stream.receive()
            await stream.send(answer)
            await anyio.sleep(hold_s)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()
