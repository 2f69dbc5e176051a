"""Prices and exact costs: pure functions over values, ``Decimal`` only (DESIGN §4, §5).

``resolve_price`` picks the price of one provider's model with the precedence of DESIGN §5:

1. explicit per-million prices from the config (``input_price_per_mtok``/``output_price_per_mtok``);
2. the guide's blended ``cost_per_1k_tokens``, applied to input plus output tokens;
3. the maintained ``genai-prices`` table for the model, at the call's time.

Ollama costs zero unless a price is configured; a paid provider with no known price is a
``ConfigError``. Cache rates follow how each provider bills them: from the table where it knows
the model, otherwise the provider's documented multiplier of the input price (Anthropic: reads
0.1x, 5-minute writes 1.25x, 1-hour writes 2x; OpenAI: reads 0.5x, writes at the input price;
Gemini: reads 0.25x, writes at the input price). Anthropic's 1-hour writes
(``Usage.cache_write_1h_tokens``, a part of ``cache_write_tokens``) are priced at
``Price.cache_write_1h_per_mtok``; a price without that rate bills them as other writes.

Long-context tiers (genai-prices' ``TieredPrices``) are a cliff: a call whose input, cache reads
and writes included, exceeds a tier's threshold pays that tier's rates for *every* token, input,
output and cache alike (genai-prices' ``calc_price``; Google's and Anthropic's billing). The
table's tiers travel in ``Price.tiers``; :func:`cost` picks the rates from the call's input, and
:func:`ceiling` gives the dearest rates a call of at most so much input can reach (reservations).
A Gemini model named with the API's ``models/`` prefix is looked up without it.

``cost`` is exact: no rounding anywhere (computed with 50 significant digits, far beyond any
token count times any price), so a thousand calls of a fraction of a cent add up to the cent.
"""

from __future__ import annotations

import decimal
import functools
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import msgspec

from events.contract import Price, PriceTier, Usage
from vapora.errors import ConfigError

__all__ = [
    "CACHE_MULTIPLIERS",
    "CACHE_WRITE_1H_MULTIPLIERS",
    "GENAI_PRICES_PROVIDER",
    "PAID_KINDS",
    "ceiling",
    "cost",
    "price_at",
    "rates_for",
    "upper_bound_cost",
    "resolve_price",
    "served_bound",
    "served_tier",
    "table_service_tiers",
    "unsaid_tiers",
    "tier_price",
    "zero_price",
    "tiers_left_out",
]

PAID_KINDS: Final = frozenset({"anthropic", "openai", "gemini"})

#: (cache read, cache write) as multiples of the input price, when the table does not say.
CACHE_MULTIPLIERS: Final[dict[str, tuple[Decimal, Decimal]]] = {
    "anthropic": (Decimal("0.1"), Decimal("1.25")),
    "openai": (Decimal("0.5"), Decimal(1)),
    "gemini": (Decimal("0.25"), Decimal(1)),
    "ollama": (Decimal(1), Decimal(1)),
}

#: Our provider kind -> the genai-prices provider id.
GENAI_PRICES_PROVIDER: Final = {"anthropic": "anthropic", "openai": "openai", "gemini": "google"}

#: An hour-long cache write as a multiple of the input price, for the providers that have one.
CACHE_WRITE_1H_MULTIPLIERS: Final[dict[str, Decimal]] = {"anthropic": Decimal(2)}

_MTOK: Final = Decimal(1_000_000)
_EXACT: Final = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)


def cost(usage: Usage, price: Price) -> Decimal:
    """The exact USD cost of ``usage`` at ``price``.

    ``usage.input_tokens`` counts all input tokens; the cache reads and writes inside it are
    billed at their own rates and the rest at the input rate. The rates are those of the tier
    that ``usage.input_tokens`` reaches (:func:`rates_for`).
    """
    rates = rates_for(price, usage.input_tokens)
    uncached = max(usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens, 0)
    hour = min(usage.cache_write_1h_tokens or 0, usage.cache_write_tokens)
    hour_rate = _hour_rate(rates)
    with decimal.localcontext(_EXACT):
        total = (
            uncached * rates.input_per_mtok
            + usage.cache_read_tokens * rates.cache_read_per_mtok
            + (usage.cache_write_tokens - hour) * rates.cache_write_per_mtok
            + hour * hour_rate
            + usage.output_tokens * rates.output_per_mtok
        )
        return total / _MTOK


def _hour_rate(rates: Price | PriceTier) -> Decimal:
    """The rate of an hour-long cache write: its own, else that of the other writes."""
    hour = rates.cache_write_1h_per_mtok
    return rates.cache_write_per_mtok if hour is None else hour


def rates_for(price: Price, input_tokens: int) -> Price | PriceTier:
    """The rates that bill a call with ``input_tokens`` of input (cache reads and writes
    included): the last tier whose threshold it exceeds, else the base rates. As genai-prices
    counts it: exactly at the threshold is still below it."""
    reached: Price | PriceTier = price
    for tier in price.tiers:
        if input_tokens > tier.above_input_tokens:
            reached = tier
    return reached


#: Input tokens a model's chat template may add past ``input_token_bound`` (a local model's
#: default system prompt, a date header): a provider's count up to this past the bound is taken
#: as given (``vapora.providers.values``), so the reservation's tiers reach it too.
TEMPLATE_ALLOWANCE = 4096


def upper_bound_cost(input_tokens: int, output_limit: int, price: Price) -> Decimal:
    """The most a call can cost, for reservations: ``input_tokens`` (a bound:
    ``vapora.providers.input_token_bound``) at the dearest input rate (a cache write may cost
    more than plain input) plus the whole output limit at the output price, each at the dearest
    of the rates the input can reach (a long-context tier bills every token past its threshold:
    :func:`ceiling`). The tiers it can reach are those of ``input_tokens`` and
    :data:`TEMPLATE_ALLOWANCE` more, the input count a provider may give past the bound and
    have taken as given (a count that crossed a tier the bound did not reach settled at 1.9
    times its hold)."""
    price = ceiling(price, input_tokens + TEMPLATE_ALLOWANCE)
    input_rate = max(
        price.input_per_mtok,
        price.cache_write_per_mtok,
        price.cache_read_per_mtok,
        price.cache_write_1h_per_mtok or 0,
    )
    return (input_tokens * input_rate + output_limit * price.output_per_mtok) / 1_000_000


def ceiling(price: Price, input_tokens: int) -> Price:
    """A flat price no lower, rate by rate, than any a call with at most ``input_tokens`` of
    input can be billed at: the base rates and those of every tier it could reach. A
    reservation estimate priced with it stays an upper bound whichever tier the call lands in.
    """
    reachable: list[Price | PriceTier] = [price]
    reachable += (t for t in price.tiers if input_tokens > t.above_input_tokens)
    if len(reachable) == 1:
        return price  # no tier reachable (the usual case): the price itself, no new object
    return Price(
        input_per_mtok=max(r.input_per_mtok for r in reachable),
        output_per_mtok=max(r.output_per_mtok for r in reachable),
        cache_read_per_mtok=max(r.cache_read_per_mtok for r in reachable),
        cache_write_per_mtok=max(r.cache_write_per_mtok for r in reachable),
        cache_write_1h_per_mtok=max(_hour_rate(r) for r in reachable),
        source=price.source,
        version=price.version,
    )


def zero_price(source: str = "ollama-local", version: str = "0") -> Price:
    """A price of nothing: local models (Ollama) unless the config prices them."""
    zero = Decimal(0)
    return Price(
        input_per_mtok=zero,
        output_per_mtok=zero,
        cache_read_per_mtok=zero,
        cache_write_per_mtok=zero,
        source=source,
        version=version,
    )


def resolve_price(
    kind: str,
    model: str,
    *,
    input_per_mtok: Decimal | float | int | str | None = None,
    output_per_mtok: Decimal | float | int | str | None = None,
    cost_per_1k_tokens: Decimal | float | int | str | None = None,
    at: datetime,
    provider: str | None = None,
) -> Price:
    """The price of ``model`` on a provider of ``kind`` at time ``at`` (DESIGN §5 precedence).

    Prices may be given as ``Decimal``, ``int``, ``str`` or a TOML ``float`` (converted through
    its shortest repr, so ``0.015`` is exactly ``Decimal("0.015")``). ``provider`` is the
    configured provider name, used in error messages (defaults to ``kind``). Raises
    ``ConfigError`` for a bad price or a paid provider whose price is unknown.
    """
    who = provider or kind
    if (input_per_mtok is None) != (output_per_mtok is None):
        raise ConfigError(
            f"provider {who!r}: set both input_price_per_mtok and output_price_per_mtok, or neither"
        )
    if input_per_mtok is not None and output_per_mtok is not None:
        inp = _money(who, "input_price_per_mtok", input_per_mtok)
        out = _money(who, "output_price_per_mtok", output_per_mtok)
        return _with_cache_rates(kind, model, inp, out, "config", "per-mtok", at)
    if cost_per_1k_tokens is not None:
        per_mtok = _money(who, "cost_per_1k_tokens", cost_per_1k_tokens) * 1000
        return _with_cache_rates(
            kind, model, per_mtok, per_mtok, "config", "cost_per_1k_tokens", at
        )
    if kind not in PAID_KINDS:
        return zero_price()
    table = _table_price(kind, model, at)
    if table is None:
        raise ConfigError(
            f"provider {who!r} ({kind}): no price known for model {model!r}; "
            "set input_price_per_mtok and output_price_per_mtok"
        )
    return table


def _money(who: str, key: str, value: Decimal | float | int | str) -> Decimal:
    """A configured price as a finite, non-negative Decimal (a float through its repr)."""
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (decimal.InvalidOperation, TypeError, ValueError):
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"provider {who!r}: {key} must be a non-negative decimal, got {value!r}")
    return amount


def _with_cache_rates(
    kind: str,
    model: str,
    input_price: Decimal,
    output_price: Decimal,
    source: str,
    version: str,
    at: datetime,
) -> Price:
    """A configured input/output price with cache rates in the provider's billing ratio."""
    read_ratio, write_ratio, hour_ratio = _cache_ratios(kind, model, at)
    return Price(
        input_per_mtok=input_price,
        output_per_mtok=output_price,
        cache_read_per_mtok=input_price * read_ratio,
        cache_write_per_mtok=input_price * write_ratio,
        cache_write_1h_per_mtok=None if hour_ratio is None else input_price * hour_ratio,
        source=source,
        version=version,
    )


def _cache_ratios(kind: str, model: str, at: datetime) -> tuple[Decimal, Decimal, Decimal | None]:
    """The table's cache/input price ratios for the model (reads, writes, hour-long writes),
    else the provider's multipliers."""
    read, write = CACHE_MULTIPLIERS.get(kind, (Decimal(1), Decimal(1)))
    hour = CACHE_WRITE_1H_MULTIPLIERS.get(kind)
    table = _table_price(kind, model, at) if kind in PAID_KINDS else None
    if table is None or not table.input_per_mtok:
        return read, write, hour
    return (
        table.cache_read_per_mtok / table.input_per_mtok,
        table.cache_write_per_mtok / table.input_per_mtok,
        None
        if table.cache_write_1h_per_mtok is None
        else table.cache_write_1h_per_mtok / table.input_per_mtok,
    )


def price_at(kind: str, model: str, loaded: Price, at: datetime) -> Price:
    """The price in force at ``at`` of a provider whose config resolved ``loaded``: a price the
    config gives is the same at any time; a price from the genai-prices table is looked up for
    ``at`` (the table dates its price changes), cached per model and UTC minute. DESIGN §4: a
    call is priced "at the call's time", not when the config was loaded."""
    if loaded.source != "genai-prices":
        return loaded
    minute = at.astimezone(UTC).replace(second=0, microsecond=0)
    return _table_price_in_minute(kind, model, minute) or loaded


def tiers_left_out(kind: str, model: str, price: Price, at: datetime) -> str | None:
    """What a flat configured ``price`` leaves out, when the genai-prices table prices ``model``
    higher above an input size (long-context tiers) at ``at``: a sentence naming the first such
    threshold and its rates (calls past it are recorded at ``price``, below the bill); else
    None. The config's price wins (DESIGN §5); this is said, not changed."""
    if price.source != "config" or price.tiers or kind not in PAID_KINDS:
        return None
    table = _table_price(kind, model, at)
    if table is None or not table.tiers:
        return None
    tier = table.tiers[0]
    return (
        f"the configured price is flat, but {model}'s provider bills a call of more than "
        f"{tier.above_input_tokens:,} input tokens at ${tier.input_per_mtok} in / "
        f"${tier.output_per_mtok} out per Mtok (genai-prices {table.version}); such calls are "
        "recorded at the configured price, below the bill (without a price in the config, the "
        "table's is used)"
    )


@functools.lru_cache(maxsize=1024)
def _table_price_in_minute(
    kind: str, model: str, minute: datetime, service_tier: str | None = None
) -> Price | None:
    return _table_price(kind, model, minute, service_tier)


#: The service tiers a provider reports that bill the standard rates (OpenAI's ``default``).
STANDARD_TIERS: Final = frozenset({"default", "auto", "standard"})
#: How a price's ``source`` names the service tier it is for (``genai-prices service_tier=flex``).
TIER_MARK: Final = " service_tier="


def served_tier(price: Price) -> str | None:
    """The service tier ``price`` is for, as :func:`tier_price` names it in its ``source``."""
    at = price.source.rfind(TIER_MARK)
    return price.source[at + len(TIER_MARK) :] if at >= 0 else None


def served_bound(kind: str, model: str, price: Price, tiers: Iterable[str], at: datetime) -> Price:
    """``price`` for bounding a call's cost (a reservation, a cost not known) of a provider
    that has said it serves at the service ``tiers``: rate by rate the dearest of the standard
    rates and those of each tier (it may serve the next call at any of them; a flex tier's
    cheaper rates never lower the bound), long-context tiers included: at every threshold any
    of them has, the dearest rates any of them bills past it (a tier variant's own long-context
    rates were dropped: a priority call past 272k input tokens settled above its hold). ``price``
    itself when no tier has rates of its own."""
    dearer = [p for t in tiers if (p := tier_price(kind, model, price, t, at)) is not None]
    if not dearer:
        return price
    every = [price, *dearer]
    base = _dearest(every)
    thresholds = sorted({tier.above_input_tokens for p in every for tier in p.tiers})
    return msgspec.structs.replace(
        price,
        input_per_mtok=base.input_per_mtok,
        output_per_mtok=base.output_per_mtok,
        cache_read_per_mtok=base.cache_read_per_mtok,
        cache_write_per_mtok=base.cache_write_per_mtok,
        cache_write_1h_per_mtok=base.cache_write_1h_per_mtok,
        tiers=tuple(
            msgspec.structs.replace(
                _dearest([rates_for(p, above + 1) for p in every]), above_input_tokens=above
            )
            for above in thresholds
        ),
        source=f"{price.source} bound over service tiers {','.join(sorted(tiers))}",
    )


def _dearest(rates: list[Price] | list[Price | PriceTier]) -> PriceTier:
    """Rate by rate the dearest of ``rates`` (an hour-long write's own rate only where one of
    them has one: else such writes bill as the other writes, as they do in each)."""
    hour = any(r.cache_write_1h_per_mtok is not None for r in rates)
    return PriceTier(
        above_input_tokens=0,
        input_per_mtok=max(r.input_per_mtok for r in rates),
        output_per_mtok=max(r.output_per_mtok for r in rates),
        cache_read_per_mtok=max(r.cache_read_per_mtok for r in rates),
        cache_write_per_mtok=max(r.cache_write_per_mtok for r in rates),
        cache_write_1h_per_mtok=max(_hour_rate(r) for r in rates) if hour else None,
    )


#: The service tiers OpenAI's ``service_tier`` request field takes (``auto``: the project's).
REQUEST_TIERS: Final = ("auto", "default", "flex", "priority", "scale")


@functools.lru_cache(maxsize=256)
def table_service_tiers(kind: str, model: str) -> frozenset[str]:
    """The service tiers other than the standard one that the genai-prices table has rates of
    their own for, for ``model`` (OpenAI's ``flex``, ``priority``, ``fast``); empty when the
    table does not know the model or has none. A call that names no tier is served at the
    project's default, any of these: :func:`served_bound` over them bounds it."""
    from genai_prices import data_snapshot

    if kind not in GENAI_PRICES_PROVIDER:
        return frozenset()
    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(
            _table_model(kind, model), None, GENAI_PRICES_PROVIDER[kind], None
        )
    except LookupError:
        return frozenset()
    tiers = set()
    for variant in getattr(info, "price_variants", None) or ():
        tier = (getattr(variant, "when", None) or {}).get("service_tier")
        if isinstance(tier, str) and tier not in STANDARD_TIERS:
            tiers.add(tier)
    return frozenset(tiers)


def unsaid_tiers(kind: str, model: str, requested: str | None) -> frozenset[str]:
    """The service tiers a call may be served at before the provider has said any, for its
    upper bound: the tier a provider's config asks for (``service_tier``; ``default`` asks for
    the standard rates), else (none asked, or ``auto``: the project's default tier, unknown
    here) every tier the table has rates of its own for, for an OpenAI model."""
    if requested is not None and requested != "auto":
        return frozenset() if requested in STANDARD_TIERS else frozenset({requested})
    return table_service_tiers(kind, model) if kind == "openai" else frozenset()


def tier_price(kind: str, model: str, loaded: Price, tier: str, at: datetime) -> Price | None:
    """The price of a call the provider says it served at service tier ``tier`` (OpenAI's
    ``service_tier``: ``priority`` bills about twice the standard rates, ``flex`` half), from
    the genai-prices table's variant for that tier at ``at``; ``loaded`` itself for a standard
    tier; None when the table has no such variant or ``loaded`` is not the table's (a price
    from the config is the standard one: its tiers are not known)."""
    if tier in STANDARD_TIERS:
        return loaded
    if loaded.source != "genai-prices":
        return None
    minute = at.astimezone(UTC).replace(second=0, microsecond=0)
    variant = _table_price_in_minute(kind, model, minute, tier)
    standard = _table_price_in_minute(kind, model, minute)
    if variant is None or variant == standard:
        return None  # no rates of that tier's own
    # Said in the price the spend event records: its rates are not the model's usual ones.
    return msgspec.structs.replace(variant, source=f"{variant.source}{TIER_MARK}{tier}")


def _table_price(
    kind: str, model: str, at: datetime, service_tier: str | None = None
) -> Price | None:
    """The genai-prices price of ``model`` at ``at``, with its long-context tiers, or None when
    the table does not know it; with ``service_tier``, the table's variant for that tier (its
    rates where it has them, the standard ones elsewhere)."""
    import genai_prices
    from genai_prices import data_snapshot

    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(
            _table_model(kind, model), None, GENAI_PRICES_PROVIDER[kind], None
        )
    except LookupError:
        return None
    prices = info.get_prices(at, {"service_tier": service_tier} if service_tier else None)
    base = _table_rates(kind, prices, None)
    if base is None:
        return None
    tiers = tuple(
        PriceTier(
            above_input_tokens=start,
            input_per_mtok=rates[0],
            output_per_mtok=rates[1],
            cache_read_per_mtok=rates[2],
            cache_write_per_mtok=rates[3],
            cache_write_1h_per_mtok=rates[4],
        )
        for start in _thresholds(prices)
        if (rates := _table_rates(kind, prices, start)) is not None
    )
    return Price(
        input_per_mtok=base[0],
        output_per_mtok=base[1],
        cache_read_per_mtok=base[2],
        cache_write_per_mtok=base[3],
        cache_write_1h_per_mtok=base[4],
        source="genai-prices",
        version=str(genai_prices.__version__),
        tiers=tiers,
    )


def _table_model(kind: str, model: str) -> str:
    # The Gemini API names models "models/gemini-2.5-flash" as readily as "gemini-2.5-flash".
    return model.removeprefix("models/") if kind == "gemini" else model


_RATE_KEYS: Final = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
)

#: (input, output, cache read, cache write, hour-long cache write or None) per million tokens.
_Rates = tuple[Decimal, Decimal, Decimal, Decimal, Decimal | None]


def _thresholds(prices: object) -> list[int]:
    """Every tier start of the token prices: each rate may change at any of them."""
    starts = {
        tier.start
        for key in _RATE_KEYS
        for tier in getattr(getattr(prices, key, None), "tiers", None) or ()
    }
    return sorted(starts)


def _table_rates(kind: str, prices: object, above: int | None) -> _Rates | None:
    """The table's rates for a call past the threshold ``above`` (None: the base rates),
    missing cache rates filled from the input rate; None without input and output prices."""
    input_price, output_price, read, write, hour = (
        _rate_above(getattr(prices, key, None), above) for key in _RATE_KEYS
    )
    if input_price is None or output_price is None:
        return None
    # A model the table gives no cache price is billed for cached tokens as its provider bills
    # them (the table leaves them out for fine-tuned OpenAI models, whose cached input is half
    # price); one without prompt caching (gpt-4) reports no cached tokens to price.
    if read is None:
        read = input_price * CACHE_MULTIPLIERS[kind][0]
    if write is None:
        write = input_price * CACHE_MULTIPLIERS[kind][1]
    if hour is None and kind in CACHE_WRITE_1H_MULTIPLIERS:
        hour = input_price * CACHE_WRITE_1H_MULTIPLIERS[kind]
    return input_price, output_price, read, write, hour


def _rate_above(value: object, above: int | None) -> Decimal | None:
    """A genai-prices price (a Decimal or TieredPrices) for a call past ``above`` input tokens
    (None: below every tier): the last tier starting at or below it, else the base; or None."""
    if value is None or isinstance(value, Decimal):
        return value
    rate = getattr(value, "base", None)
    for tier in getattr(value, "tiers", None) or ():
        if above is not None and tier.start <= above:
            rate = tier.price
    return rate if isinstance(rate, Decimal) else None
