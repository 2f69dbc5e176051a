"""Cache-token semantics per provider, and their costs checked against hand-computed values.

Our ``Usage.input_tokens`` counts every input token, cached ones included (OpenTelemetry); cache
reads and writes are subsets of it. Each provider reports differently:

- Anthropic: ``input_tokens`` excludes the cache; reads and writes are reported beside it.
- OpenAI: ``prompt_tokens`` includes ``cached_tokens``; writes are not surcharged.
- Gemini: ``promptTokenCount`` includes ``cachedContentTokenCount``; output is candidates +
  thoughts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import httpx
import pytest

from events.contract import Usage
from tests.providers.conftest import MODELS, SECRET
from vapora.pricing import cost, resolve_price
from vapora.providers import ProviderRequest, make_client
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio

AT = datetime(2026, 11, 1, tzinfo=UTC)
PROMPT = "one two three four five six"  # 7 prompt tokens in the simulator; 6 output words
TABLE_MODELS = {"anthropic": "claude-sonnet-4-6", "openai": "gpt-4o", "gemini": "gemini-2.5-flash"}


async def _raw_and_ours(sim: Simulator, kind: str, suffix: str) -> tuple[dict[str, int], Usage]:
    """The provider's raw usage (from the simulator, as the provider reports it) and ours."""
    model = f"{TABLE_MODELS[kind]}-{suffix}"
    price = resolve_price(kind, TABLE_MODELS[kind], at=AT)
    client = make_client(
        name=kind,
        kind=kind,
        model=model,
        price=price,
        api_key=SECRET,
        base_url=sim.base_url_for(kind),
    )
    done = await client.complete(ProviderRequest(prompt=PROMPT, max_tokens=100))
    await client.aclose()
    raw = await _raw_usage(sim, kind, model)
    return raw, done.usage


async def _raw_usage(sim: Simulator, kind: str, model: str) -> dict[str, int]:
    headers = {"authorization": f"Bearer {SECRET}", "x-goog-api-key": SECRET}
    async with httpx.AsyncClient(base_url=sim.base_url, headers=headers) as http:
        if kind == "anthropic":
            body = {
                "model": model,
                "max_tokens": 100,
                "messages": [{"role": "user", "content": PROMPT}],
            }
            return dict((await http.post("/v1/messages", json=body)).json()["usage"])
        if kind == "openai":
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
            usage = (await http.post("/v1/chat/completions", json=body)).json()["usage"]
            return {**usage, **usage["prompt_tokens_details"]}
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
        path = f"/v1beta/models/{model}:generateContent"
        return dict((await http.post(path, json=body)).json()["usageMetadata"])


async def test_anthropic_input_adds_cache_reads_and_writes(sim: Simulator) -> None:
    raw, usage = await _raw_and_ours(sim, "anthropic", "cached-100-cachew-50")

    assert (raw["input_tokens"], raw["cache_read_input_tokens"]) == (7, 100)
    assert raw["cache_creation_input_tokens"] == 50
    assert usage == Usage(
        input_tokens=157, output_tokens=6, cache_read_tokens=100, cache_write_tokens=50
    )


async def test_anthropic_hour_long_cache_writes_are_billed_at_their_own_rate(
    sim: Simulator,
) -> None:
    # They were billed as five-minute writes: 1.25x the input price instead of 2x.
    raw, usage = await _raw_and_ours(sim, "anthropic", "cachew-50-cachew1h-20")
    assert raw["cache_creation_input_tokens"] == 70
    assert raw["cache_creation"] == {
        "ephemeral_5m_input_tokens": 50,
        "ephemeral_1h_input_tokens": 20,
    }
    assert usage == Usage(
        input_tokens=77, output_tokens=6, cache_write_tokens=70, cache_write_1h_tokens=20
    )
    # claude-sonnet-4-6: $3 in, $15 out, $3.75 five-minute writes, $6 hour-long writes
    # 7*3 + 50*3.75 + 20*6 + 6*15 = 21 + 187.5 + 120 + 90 = 418.5 per million
    price = resolve_price("anthropic", TABLE_MODELS["anthropic"], at=AT)
    assert cost(usage, price) == Decimal("0.0004185")
    client = make_client(
        name="anthropic",
        kind="anthropic",
        model=f"{TABLE_MODELS['anthropic']}-cachew-50-cachew1h-20",
        price=price,
        api_key=SECRET,
        base_url=sim.base_url_for("anthropic"),
    )
    try:
        async with client.stream(ProviderRequest(prompt=PROMPT, max_tokens=100)) as stream:
            _ = [text async for text in stream]
    finally:
        await client.aclose()
    assert stream.completion is not None and stream.completion.usage == usage


async def test_openai_prompt_tokens_already_include_the_cache(sim: Simulator) -> None:
    raw, usage = await _raw_and_ours(sim, "openai", "cached-100")

    assert (raw["prompt_tokens"], raw["cached_tokens"]) == (107, 100)
    assert usage == Usage(input_tokens=107, output_tokens=6, cache_read_tokens=100)


async def test_gemini_prompt_includes_the_cache_and_output_includes_thoughts(
    sim: Simulator,
) -> None:
    raw, usage = await _raw_and_ours(sim, "gemini", "cached-100-thoughts-5")

    assert (raw["promptTokenCount"], raw["cachedContentTokenCount"]) == (107, 100)
    assert (raw["candidatesTokenCount"], raw["thoughtsTokenCount"]) == (6, 5)
    assert usage == Usage(input_tokens=107, output_tokens=11, cache_read_tokens=100)


@pytest.mark.parametrize(
    ("kind", "suffix", "expected"),
    [
        # claude-sonnet-4-6: $3 in, $15 out, $0.30 cache read (0.1x), $3.75 cache write (1.25x)
        # 7*3 + 100*0.3 + 50*3.75 + 6*15 = 21 + 30 + 187.5 + 90 = 328.5 per million
        ("anthropic", "cached-100-cachew-50", Decimal("0.0003285")),
        # gpt-4o: $2.50 in, $10 out, $1.25 cached (0.5x)
        # 7*2.5 + 100*1.25 + 6*10 = 17.5 + 125 + 60 = 202.5 per million
        ("openai", "cached-100", Decimal("0.0002025")),
        # gemini-2.5-flash: $0.30 in, $2.50 out (thoughts too), $0.03 cached (0.1x)
        # 7*0.3 + 100*0.03 + (6+5)*2.5 = 2.1 + 3 + 27.5 = 32.6 per million
        ("gemini", "cached-100-thoughts-5", Decimal("0.0000326")),
    ],
)
async def test_cost_of_cached_calls_is_priced_as_billed(
    kind: str, suffix: str, expected: Decimal, sim: Simulator
) -> None:
    _, usage = await _raw_and_ours(sim, kind, suffix)

    assert cost(usage, resolve_price(kind, TABLE_MODELS[kind], at=AT)) == expected


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=1000, output_tokens=500),
        Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=600),
        Usage(input_tokens=1000, output_tokens=1, cache_read_tokens=300, cache_write_tokens=200),
        Usage(input_tokens=3, output_tokens=0, cache_write_tokens=3),
        Usage(
            input_tokens=1000,
            output_tokens=1,
            cache_read_tokens=300,
            cache_write_tokens=200,
            cache_write_1h_tokens=150,
        ),
    ],
)
def test_our_cost_equals_genai_prices_own_calculation(kind: str, usage: Usage) -> None:
    """genai-prices' calc_price uses the same convention (input includes the cache; the
    hour-long writes are a part of the writes)."""
    model = TABLE_MODELS[kind]
    hourly = (
        {"cache_write_1h_tokens": usage.cache_write_1h_tokens or 0} if kind == "anthropic" else {}
    )
    theirs = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            **hourly,
        ),
        model,
        provider_id={"gemini": "google"}.get(kind, kind),
        genai_request_timestamp=AT,
    )

    assert cost(usage, resolve_price(kind, model, at=AT)) == theirs.total_price


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini", "ollama"])
async def test_cache_counts_are_subsets_of_input(kind: str, sim: Simulator) -> None:
    model = f"{MODELS[kind]}-cached-30-cachew-20"
    client = make_client(
        name=kind,
        kind=kind,
        model=model,
        price=resolve_price(kind, "x", input_per_mtok=1, output_per_mtok=1, at=AT),
        api_key=SECRET,
        base_url=sim.base_url_for(kind),
    )
    done = await client.complete(ProviderRequest(prompt=PROMPT))
    await client.aclose()
    usage = done.usage

    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.input_tokens
    assert usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens == 7


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
@pytest.mark.parametrize(("thoughts", "words"), [(2, 3), (20, 0)])
async def test_thinking_counts_against_max_tokens(
    kind: str, thoughts: int, words: int, sim: Simulator
) -> None:
    # The simulator added thinking on top of an answer already cut to max_tokens: a call
    # reported five times its limit, which no provider does, and settled past the reservation.
    client = make_client(
        name=kind,
        kind=kind,
        model=f"{TABLE_MODELS[kind]}-thoughts-{thoughts}",
        price=resolve_price(kind, TABLE_MODELS[kind], at=AT),
        api_key=SECRET,
        base_url=sim.base_url_for(kind),
    )
    try:
        done = await client.complete(ProviderRequest(prompt=PROMPT, max_tokens=5))
        async with client.stream(ProviderRequest(prompt=PROMPT, max_tokens=5)) as stream:
            streamed = "".join([text async for text in stream])
    finally:
        await client.aclose()
    assert done.usage.output_tokens == 5 and done.finish_reason == "length"
    assert len(done.text.split()) == words and streamed == done.text
    assert stream.completion is not None and stream.completion.usage == done.usage
