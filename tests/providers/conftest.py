"""Fixtures for the provider clients, pricing and simulator tests: a simulator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

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
    """``client_for(kind, model_suffix="", **options)``: a client of ``kind`` on the simulator."""
    made: list[ProviderClient] = []

    def build(kind: str, suffix: str = "", **options: Any) -> ProviderClient:
        options.setdefault("api_key", SECRET)
        options.setdefault("timeout", 5.0)
        options.setdefault("base_url", sim.base_url_for(kind))
        client = make_client(
            name=f"{kind}-sim",
            kind=kind,
            model=MODELS[kind] + (f"-{suffix}" if suffix else ""),
            price=price_of(kind),
            **options,
        )
        made.append(client)
        return client

    yield build
    for client in made:
        await client.aclose()
