"""Price resolution (DESIGN §5 precedence) and exact costs: pure functions, no fixtures."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.contract import Price, Usage
from vapora.errors import ConfigError
from vapora.pricing import cost, resolve_price, zero_price

AT = datetime(2026, 11, 1, tzinfo=UTC)


def test_explicit_per_million_prices_win_over_everything() -> None:
    price = resolve_price(
        "anthropic",
        "claude-sonnet-4-6",
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
        cost_per_1k_tokens=Decimal("0.5"),
        at=AT,
    )

    assert (price.input_per_mtok, price.output_per_mtok) == (1, 2)
    assert (price.source, price.version) == ("config", "per-mtok")


def test_explicit_prices_get_the_providers_cache_rates() -> None:
    claude = resolve_price(
        "anthropic", "claude-sonnet-4-6", input_per_mtok=10, output_per_mtok=50, at=AT
    )
    gpt = resolve_price("openai", "gpt-4o", input_per_mtok=10, output_per_mtok=40, at=AT)
    unknown = resolve_price(
        "openai", "not-in-the-table", input_per_mtok=10, output_per_mtok=40, at=AT
    )

    # Anthropic: reads 0.1x, 5-minute writes 1.25x (from the table's ratios for the model)
    assert (claude.cache_read_per_mtok, claude.cache_write_per_mtok) == (1, Decimal("12.5"))
    # OpenAI gpt-4o: cached input at half price, writes at the input price
    assert (gpt.cache_read_per_mtok, gpt.cache_write_per_mtok) == (5, 10)
    # a model the table does not know: the provider's documented multipliers
    assert (unknown.cache_read_per_mtok, unknown.cache_write_per_mtok) == (5, 10)


def test_blended_cost_per_1k_applies_to_input_and_output() -> None:
    price = resolve_price("openai", "gpt-4", cost_per_1k_tokens=0.030, at=AT)  # a TOML float

    assert price.input_per_mtok == price.output_per_mtok == Decimal("30")
    assert price.cache_read_per_mtok == Decimal("30")  # gpt-4 has no cache discount in the table
    assert (price.source, price.version) == ("config", "cost_per_1k_tokens")


def test_the_guides_config_prices_its_four_providers() -> None:
    claude = resolve_price("anthropic", "claude-opus-4-5", cost_per_1k_tokens=0.015, at=AT)
    gemini = resolve_price("gemini", "gemini-2.0-flash", cost_per_1k_tokens=0.005, at=AT)
    ollama = resolve_price("ollama", "llama2", cost_per_1k_tokens=0.0, at=AT)

    assert claude.input_per_mtok == 15 and claude.cache_write_per_mtok == Decimal("18.75")
    assert gemini.input_per_mtok == 5 and gemini.cache_read_per_mtok == Decimal("1.25")
    assert cost(Usage(input_tokens=10**6, output_tokens=10**6), ollama) == 0


def test_the_table_prices_a_known_model_with_its_source_and_version() -> None:
    price = resolve_price("anthropic", "claude-sonnet-4-6", at=AT)

    assert price == Price(
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cache_read_per_mtok=Decimal("0.3"),
        cache_write_per_mtok=Decimal("3.75"),
        source="genai-prices",
        version=genai_prices.__version__,
    )


def test_the_table_price_is_the_one_in_force_at_the_calls_time() -> None:
    before = resolve_price("openai", "o3", at=datetime(2025, 5, 1, tzinfo=UTC))
    after = resolve_price("openai", "o3", at=datetime(2025, 7, 1, tzinfo=UTC))

    assert (before.input_per_mtok, before.output_per_mtok) == (10, 40)
    assert (after.input_per_mtok, after.output_per_mtok) == (2, 8)


def test_ollama_is_free_unless_configured() -> None:
    assert resolve_price("ollama", "llama3.2", at=AT) == zero_price()
    priced = resolve_price(
        "ollama", "llama3.2", input_per_mtok="0.01", output_per_mtok="0.02", at=AT
    )
    assert priced.output_per_mtok == Decimal("0.02")


def test_a_paid_provider_without_a_known_price_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_price("openai", "gpt-unknown-9", at=AT, provider="my-openai")

    assert "my-openai" in caught.value.message and "gpt-unknown-9" in caught.value.message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_per_mtok": Decimal("1")},  # one of the pair
        {"input_per_mtok": Decimal("-1"), "output_per_mtok": Decimal("1")},
        {"input_per_mtok": "NaN", "output_per_mtok": Decimal("1")},
        {"cost_per_1k_tokens": "lots"},
        {"cost_per_1k_tokens": float("inf")},
    ],
)
def test_bad_prices_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        resolve_price("openai", "gpt-4o", at=AT, **kwargs)  # type: ignore[arg-type]


PRICE = Price(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
    source="test",
    version="1",
)


def test_cost_by_hand() -> None:
    usage = Usage(
        input_tokens=1157, output_tokens=250, cache_read_tokens=1000, cache_write_tokens=100
    )

    # 57 * 3 + 1000 * 0.3 + 100 * 3.75 + 250 * 15 = 171 + 300 + 375 + 3750 = 4596 per million
    assert cost(usage, PRICE) == Decimal("0.004596")


def test_tiny_costs_add_up_exactly() -> None:
    cheap = Price(
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.6"),
        cache_read_per_mtok=Decimal("0.075"),
        cache_write_per_mtok=Decimal("0.15"),
        source="t",
        version="1",
    )
    one_token = cost(Usage(input_tokens=1), cheap)

    assert one_token == Decimal("0.00000015")  # not rounded to a cent, nor to zero
    assert sum([one_token] * 1000, Decimal(0)) == Decimal("0.00015")


@given(
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
)
def test_cost_is_linear_and_exact(uncached: int, read: int, write: int, output: int) -> None:
    usage = Usage(
        input_tokens=uncached + read + write,
        output_tokens=output,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )

    total = cost(usage, PRICE)

    expected = uncached * 3 + read * Decimal("0.3") + write * Decimal("3.75") + output * 15
    assert total == expected / 1_000_000
    assert total * 1_000_000 == expected  # dividing by a million lost nothing
