"""Price resolution (DESIGN §5 precedence) and exact costs: pure functions, no fixtures."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import genai_prices
import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from events import SpendRecorded, TaskType, decode_event, encode
from events.contract import Price, PriceTier, Usage
from vapora.audit import recompute_cost
from vapora.errors import ConfigError
from vapora.pricing import cost, resolve_price, tiers_left_out, upper_bound_cost, zero_price
from vapora.providers import ProviderRequest, make_client
from vapora.providers.values import input_token_bound

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


def test_a_table_model_without_a_cache_price_gets_its_providers_discount() -> None:
    # The table has no cached-input price for fine-tuned OpenAI models: their cached tokens
    # were billed at the full input price (OpenAI bills them at half, as for gpt-4o).
    tuned = resolve_price("openai", "ft:gpt-4o-2024-08-06:acme::abc123", at=AT)
    assert (tuned.input_per_mtok, tuned.cache_read_per_mtok) == (Decimal("3.75"), Decimal("1.875"))
    usage = Usage(input_tokens=1_000_000, output_tokens=0, cache_read_tokens=1_000_000)
    assert cost(usage, tuned) == Decimal("1.875")


def test_blended_cost_per_1k_applies_to_input_and_output() -> None:
    price = resolve_price("openai", "gpt-4", cost_per_1k_tokens=0.030, at=AT)  # a TOML float

    assert price.input_per_mtok == price.output_per_mtok == Decimal("30")
    # gpt-4 has no cache price in the table (nor caching): OpenAI's half price, never used
    assert price.cache_read_per_mtok == Decimal("15")
    assert (price.source, price.version) == ("config", "cost_per_1k_tokens")


def test_the_guides_config_prices_its_four_providers() -> None:
    claude = resolve_price("anthropic", "claude-opus-4-5", cost_per_1k_tokens=0.015, at=AT)
    gemini = resolve_price("gemini", "gemini-2.0-flash", cost_per_1k_tokens=0.005, at=AT)
    ollama = resolve_price("ollama", "llama2", cost_per_1k_tokens=0.0, at=AT)

    assert claude.input_per_mtok == 15 and claude.cache_write_per_mtok == Decimal("18.75")
    assert claude.cache_write_1h_per_mtok == 30  # hour-long writes: 2x
    assert gemini.input_per_mtok == 5 and gemini.cache_read_per_mtok == Decimal("1.25")
    assert cost(Usage(input_tokens=10**6, output_tokens=10**6), ollama) == 0


def test_the_table_prices_a_known_model_with_its_source_and_version() -> None:
    price = resolve_price("anthropic", "claude-sonnet-4-6", at=AT)

    assert price == Price(
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cache_read_per_mtok=Decimal("0.3"),
        cache_write_per_mtok=Decimal("3.75"),
        cache_write_1h_per_mtok=Decimal("6"),
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


# --- long-context tiers: past the threshold every token is billed at the tier's rates ------------

GENAI_PROVIDER = {"gemini": "google", "anthropic": "anthropic"}
THRESHOLD = 200_000  # gemini-2.5-pro's and claude-sonnet-4-5's long-context threshold


def table_cost(kind: str, model: str, usage: Usage) -> Decimal:
    """What genai-prices' own ``calc_price`` bills for ``usage`` (same token semantics)."""
    theirs = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens or 0,
    )
    return genai_prices.calc_price(
        theirs, model_ref=model, provider_id=GENAI_PROVIDER[kind], genai_request_timestamp=AT
    ).total_price


# (input incl. cache, output, cache read, cache write): below, at and past the threshold; the
# last ones cross it only with their cache tokens counted (the threshold is on total input).
TIER_USAGES = [
    (THRESHOLD - 1, 2_000, 50_000, 0),
    (THRESHOLD, 2_000, 150_000, 0),
    (THRESHOLD + 1, 2_000, 0, 0),
    (300_000, 2_000, 100_000, 0),
    (THRESHOLD + 1, 1_000, 190_000, 0),
]
CLAUDE_USAGES = [
    (THRESHOLD, 1_500, 120_000, 30_000),
    (THRESHOLD + 1, 1_500, 120_000, 30_000),
    (250_000, 1_500, 0, 240_000),
]


@pytest.mark.parametrize(
    ("kind", "model", "tokens"),
    [("gemini", "gemini-2.5-pro", t) for t in TIER_USAGES]
    + [("anthropic", "claude-sonnet-4-5", t) for t in TIER_USAGES + CLAUDE_USAGES],
)
def test_long_context_tiers_cost_what_genai_prices_calc_price_bills(
    kind: str, model: str, tokens: tuple[int, int, int, int]
) -> None:
    inp, out, read, write = tokens
    usage = Usage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write
    )

    assert cost(usage, resolve_price(kind, model, at=AT)) == table_cost(kind, model, usage)


def test_past_the_threshold_every_token_pays_the_long_context_rates() -> None:
    price = resolve_price("gemini", "gemini-2.5-pro", at=AT)

    below = cost(Usage(input_tokens=THRESHOLD, output_tokens=2_000), price)
    past = cost(Usage(input_tokens=300_000, output_tokens=2_000), price)

    assert below == Decimal("0.27")  # 200k x 1.25 + 2k x 10 per million
    assert past == Decimal("0.78")  # 300k x 2.50 + 2k x 15 per million: not 0.395


def test_the_table_price_carries_its_tiers_and_a_flat_model_has_none() -> None:
    pro = resolve_price("gemini", "gemini-2.5-pro", at=AT)
    sonnet = resolve_price("anthropic", "claude-sonnet-4-5", at=AT)

    assert pro.tiers == (
        PriceTier(
            above_input_tokens=THRESHOLD,
            input_per_mtok=Decimal("2.5"),
            output_per_mtok=Decimal("15"),
            cache_read_per_mtok=Decimal("0.25"),
            cache_write_per_mtok=Decimal("2.5"),  # no write price in the table: the input's
        ),
    )
    assert [(t.input_per_mtok, t.cache_write_per_mtok) for t in sonnet.tiers] == [
        (Decimal(6), Decimal("7.5"))
    ]
    assert resolve_price("gemini", "gemini-2.5-flash", at=AT).tiers == ()


def test_a_configured_price_has_no_tiers_and_stays_flat_past_any_threshold() -> None:
    price = resolve_price(
        "gemini", "gemini-2.5-pro", input_per_mtok="1.25", output_per_mtok="10", at=AT
    )

    assert price.tiers == ()
    assert cost(Usage(input_tokens=300_000, output_tokens=2_000), price) == Decimal("0.395")


def test_a_configured_flat_price_says_which_long_context_rates_it_leaves_out() -> None:
    """A configured price wins over the table (DESIGN §5) and is flat: a call past the model's
    long-context threshold is recorded below the bill (0.395 against Google's 0.78 above). The
    operator is told at `vapora config` and at the provider actor's start."""
    flat = resolve_price(
        "gemini", "gemini-2.5-pro", input_per_mtok="1.25", output_per_mtok="10", at=AT
    )
    said = tiers_left_out("gemini", "gemini-2.5-pro", flat, AT)
    table = resolve_price("gemini", "gemini-2.5-pro", at=AT)
    [tier, *_] = table.tiers
    assert said is not None
    assert f"{tier.above_input_tokens:,} input tokens" in said
    assert f"${tier.input_per_mtok} in / ${tier.output_per_mtok} out" in said
    assert tiers_left_out("gemini", "gemini-2.5-pro", table, AT) is None  # the table's: tiered
    plain = resolve_price("openai", "gpt-4o", input_per_mtok="2.5", output_per_mtok="10", at=AT)
    assert resolve_price("openai", "gpt-4o", at=AT).tiers == ()  # (no tiers to leave out)
    assert tiers_left_out("openai", "gpt-4o", plain, AT) is None
    assert tiers_left_out("ollama", "llama3", zero_price(), AT) is None


def test_a_gemini_model_named_with_the_models_prefix_has_the_tables_price() -> None:
    assert resolve_price("gemini", "models/gemini-2.5-flash", at=AT) == resolve_price(
        "gemini", "gemini-2.5-flash", at=AT
    )
    assert resolve_price("gemini", "models/gemini-2.5-pro", at=AT).tiers


def test_an_event_priced_before_tiers_decodes_and_costs_as_it_did() -> None:
    golden = Path(__file__).parent.parent / "golden" / "events" / "spend_recorded.json"
    event = decode_event(golden.read_bytes())
    assert isinstance(event, SpendRecorded)

    assert event.price.tiers == ()
    assert recompute_cost(event) == event.cost_usd == Decimal("0.006150")
    assert b"tiers" not in encode(event.price)  # a flat price encodes as it always did


@pytest.mark.parametrize("hour", [0, 600])
def test_the_audit_recomputes_a_tiered_spend_exactly_from_its_recorded_price(hour: int) -> None:
    price = resolve_price("anthropic", "claude-sonnet-4-5", at=AT)
    usage = Usage(
        input_tokens=260_000,
        output_tokens=3_000,
        cache_read_tokens=200_000,
        cache_write_tokens=1_000,
        cache_write_1h_tokens=hour,  # past the threshold: the tier's $12 instead of $7.50
    )
    event = SpendRecorded(
        id="spend-long",
        at=AT,
        task_id="task-long",
        task_type=TaskType.CODE_REVIEW,
        provider="claude",
        model="claude-sonnet-4-5",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        cost_usd=cost(usage, price),
        price=price,
    )

    replayed = decode_event(encode(event))

    assert replayed == event and isinstance(replayed, SpendRecorded)
    assert recompute_cost(replayed) == table_cost("anthropic", "claude-sonnet-4-5", usage)


def with_tiers(*tiers: tuple[int, str]) -> bytes:
    """``PRICE`` as JSON with these (threshold, rate for all four) tiers, valid or not."""
    listed = [
        {"above_input_tokens": above, **dict.fromkeys(RATE_NAMES, rate)} for above, rate in tiers
    ]
    return encode(PRICE)[:-1] + b',"tiers":' + msgspec.json.encode(listed) + b"}"


RATE_NAMES = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")


def test_a_price_with_tiers_round_trips() -> None:
    price = msgspec.json.decode(with_tiers((100, "2"), (200, "4")), type=Price)

    assert [t.above_input_tokens for t in price.tiers] == [100, 200]
    assert msgspec.json.decode(encode(price), type=Price) == price


@pytest.mark.parametrize(
    "tiers",
    [((200, "2"), (100, "4")), ((100, "2"), (100, "4")), ((100, "NaN"),), ((100, "-1"),)],
)
def test_tiers_out_of_order_or_not_money_do_not_decode(tiers: tuple[tuple[int, str], ...]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(with_tiers(*tiers), type=Price)


def test_the_reservation_estimate_reaches_the_long_context_rates() -> None:
    price = resolve_price("gemini", "gemini-2.5-pro", at=AT)
    client = make_client(name="gemini", kind="gemini", model="gemini-2.5-pro", price=price)
    short = ProviderRequest(prompt="x" * 3_000, max_tokens=2_000)
    long = ProviderRequest(prompt="x" * 900_000, max_tokens=2_000)
    assert input_token_bound(short) < THRESHOLD < input_token_bound(long)

    # below the threshold: the base rates; past it: the long-context ones, for every token
    assert (
        client.estimate_cost(short)
        == (input_token_bound(short) * Decimal("1.25") + 2_000 * 10) / 10**6
    )
    assert (
        client.estimate_cost(long)
        == (input_token_bound(long) * Decimal("2.5") + 2_000 * 15) / 10**6
    )


@example(prompt_chars=900_000, share=Fraction(1), cached=Fraction(0), output=8_192)
@example(prompt_chars=510_000, share=Fraction(1), cached=Fraction(1, 2), output=8_192)
@given(
    prompt_chars=st.integers(1, 1_200_000),
    share=st.fractions(0, 1),
    cached=st.fractions(0, 1),
    output=st.integers(0, 8_192),
)
def test_the_reservation_estimate_bounds_every_tier_the_call_can_land_in(
    prompt_chars: int, share: Fraction, cached: Fraction, output: int
) -> None:
    price = resolve_price("anthropic", "claude-sonnet-4-5", at=AT)
    client = make_client(name="claude", kind="anthropic", model="claude-sonnet-4-5", price=price)
    request = ProviderRequest(prompt="x" * prompt_chars, max_tokens=8_192)
    bound = input_token_bound(request)
    billed = int(bound * share)  # any input up to the bound, any part of it cached
    written = int(billed * cached)

    usage = Usage(input_tokens=billed, output_tokens=output, cache_write_tokens=written)

    assert cost(usage, price) <= client.estimate_cost(request)


def test_a_reservation_bounds_input_written_to_the_cache_for_an_hour() -> None:
    # The bound took the five-minute write (1.25x) as the dearest input rate: an input written
    # for an hour (2x) could settle past its reservation.
    from vapora.pricing import upper_bound_cost

    price = resolve_price("anthropic", "claude-sonnet-4-6", at=AT)
    assert upper_bound_cost(1_000_000, 0, price) == Decimal(6)
    usage = Usage(input_tokens=1_000_000, cache_write_tokens=10**6, cache_write_1h_tokens=10**6)
    assert cost(usage, price) == upper_bound_cost(1_000_000, 0, price)
    tiered = resolve_price("anthropic", "claude-sonnet-4-5", at=AT)
    assert upper_bound_cost(300_000, 0, tiered) == Decimal("3.6")  # 300k at the tier's $12


def test_a_bound_over_service_tiers_is_the_dearest_of_their_rates_and_never_below_standard() -> (
    None
):
    """A provider that served a call at flex (half the standard rates) may serve the next at
    the standard tier: a bound at flex rates under-reserved it (a review)."""
    from vapora.pricing import _table_price, served_bound

    now = datetime.now(UTC)
    standard = _table_price("openai", "gpt-5", now)
    assert standard is not None
    flex = served_bound("openai", "gpt-5", standard, {"flex"}, now)
    both = served_bound("openai", "gpt-5", standard, {"flex", "priority"}, now)
    assert (flex.input_per_mtok, flex.output_per_mtok) == (
        standard.input_per_mtok,
        standard.output_per_mtok,
    )
    assert (both.input_per_mtok, both.output_per_mtok) == (
        2 * standard.input_per_mtok,
        2 * standard.output_per_mtok,
    )
    assert served_bound("openai", "gpt-5", standard, set(), now) is standard


def _openai_models_with_tiers() -> list[str]:
    from genai_prices import data_snapshot

    from vapora.pricing import table_service_tiers

    [openai] = [p for p in data_snapshot.get_snapshot().providers if p.id == "openai"]
    return sorted(m.id for m in openai.models if table_service_tiers("openai", m.id))


def test_a_bound_over_service_tiers_is_no_lower_than_any_tiers_bill_at_any_input_size() -> None:
    """A tier variant's own long-context rates were dropped from the bound: a priority call of
    300,000 input tokens to a model whose priority rates double past 272k settled at $2.43
    against a $1.52 hold (a review). For every OpenAI model the table has tiers for, at inputs
    on each side of every threshold, the bound's cost is no lower than any tier's bill."""
    from vapora.pricing import _table_price, served_bound, table_service_tiers, tier_price

    now = datetime.now(UTC)
    models = _openai_models_with_tiers()
    assert len(models) > 10
    checked = 0
    for model in models:
        standard = _table_price("openai", model, now)
        if standard is None:
            continue
        tiers = table_service_tiers("openai", model)
        bound = served_bound("openai", model, standard, tiers, now)
        prices = [standard, *(tier_price("openai", model, standard, t, now) for t in tiers)]
        thresholds = {t.above_input_tokens for p in prices if p is not None for t in p.tiers}
        sizes = {1_000, 2_000_000, *(n + d for n in thresholds for d in (0, 1, 5_000))}
        for size in sorted(sizes):
            usage = Usage(input_tokens=size, output_tokens=1_000, cache_read_tokens=size // 4)
            for price in prices:
                if price is not None:
                    assert cost(usage, bound) >= cost(usage, price), (model, size, price.source)
                    checked += 1
            assert upper_bound_cost(size, 1_000, bound) >= max(
                cost(Usage(input_tokens=size, output_tokens=1_000), p) for p in prices if p
            )
    assert checked > 100
