"""The reservation of an attempt holds an upper bound of its cost, so that holds admitted under a
limit can never settle past it. The input's part of that bound was an estimate (1.2 x chars/3):
text of digits or hex tokenizes at 1 token per 1 to 1.7 characters (o200k_base, cl100k_base), and
nine holds admitted under a $1 daily limit settled at $2.25."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from events.contract import BudgetReserve, ChatMessage, TaskType, Usage
from events.log import BudgetReserved, SpendRecorded
from tests.samples import PRICE
from vapora import budget
from vapora.pricing import upper_bound_cost
from vapora.providers import ProviderRequest, input_token_bound

AT = datetime(2026, 6, 15, 12, tzinfo=UTC)
# Measured with tiktoken (o200k_base and cl100k_base): comma-separated digits are one token per
# character, hex about 0.58; CJK up to one token per character, emoji up to one per byte.
DENSE = {
    "digits": ",".join(str(i % 10) for i in range(50_000)),
    "hex": "".join(f"{i * 2654435761 % 2**32:08x}" for i in range(12_000)),
    "cjk": "中文字符" * 5_000,
    "emoji": "🙂🚀" * 5_000,
}


@pytest.mark.parametrize("kind", sorted(DENSE))
def test_the_input_bound_is_at_least_one_token_per_byte_of_text(kind: str) -> None:
    text = DENSE[kind]
    request = ProviderRequest(prompt=text)
    assert input_token_bound(request) >= len(text.encode())


def test_every_message_and_the_system_prompt_add_their_template_tokens() -> None:
    one = input_token_bound(ProviderRequest(prompt="hi"))
    three = input_token_bound(
        ProviderRequest(
            messages=(
                ChatMessage(role="user", content="hi"),
                ChatMessage(role="assistant", content=""),
            ),
            system="s",
        )
    )
    assert three - one >= 2 * 4 + len("s")


def test_holds_admitted_under_a_daily_limit_never_settle_past_it() -> None:
    prompt = DENSE["digits"]
    real_tokens = len(prompt)  # one token per character, as measured
    request = ProviderRequest(prompt=prompt, max_tokens=1)
    bound = upper_bound_cost(input_token_bound(request), request.output_limit, PRICE)
    actual = (real_tokens * PRICE.input_per_mtok + PRICE.output_per_mtok) / Decimal(1_000_000)
    assert bound >= actual
    limits = budget.BudgetLimits.from_cents(daily_cents=100)
    state, admitted = budget.EMPTY, 0
    for i in range(20):
        ask = BudgetReserve(
            reservation_id=f"r{i}", task_id=f"t{i}", provider="openai", amount_usd=bound
        )
        if budget.admit(state, limits, ask, AT).admitted:
            admitted += 1
            state = budget.evolve(
                state,
                BudgetReserved(
                    id=f"e{i}",
                    at=AT,
                    task_id=f"t{i}",
                    reservation_id=f"r{i}",
                    provider="openai",
                    amount_usd=bound,
                    expires_at=AT + timedelta(minutes=2),
                ),
            )
    for i in range(admitted):
        spend = SpendRecorded(
            id=f"s{i}",
            at=AT,
            task_id=f"t{i}",
            task_type=TaskType.GENERAL_QUERY,
            provider="openai",
            model="gpt-4o",
            input_tokens=real_tokens,
            output_tokens=1,
            cost_usd=actual,
            price=PRICE,
            reservation_id=f"r{i}",
        )
        state = budget.evolve(state, spend)
    assert admitted > 0
    assert state.spent_on(AT.date()) <= Decimal(1)


def test_the_bound_prices_a_long_prompt_at_its_long_context_tier() -> None:
    """The router held the base rates for a prompt past a tier's threshold, where every token
    is billed at the tier's (a 300k-token gemini-2.5-pro prompt: twice the base)."""
    from vapora.pricing import cost, resolve_price

    price = resolve_price("gemini", "gemini-2.5-pro", at=AT)
    assert price.tiers, "gemini-2.5-pro has a long-context tier in the price table"
    request = ProviderRequest(prompt="x" * 300_000, max_tokens=1_000)
    bound = upper_bound_cost(input_token_bound(request), request.output_limit, price)
    billed = cost(Usage(input_tokens=300_000, output_tokens=1_000), price)
    assert bound >= billed > cost(Usage(input_tokens=150_000, output_tokens=1_000), price) * 2


def test_a_short_time_limit_is_refused_only_after_waiting_in_the_backlog() -> None:
    """A call with ``timeout_ms`` of 50 or less was refused as stale without having waited at
    all: a request with ``latency_required_ms`` that low failed every attempt."""
    from actors.provider import _stale
    from events.contract import ProviderCall

    call = ProviderCall(
        task_id="t",
        task_type=TaskType.GENERAL_QUERY,
        attempt=1,
        model="m",
        prompt="hi",
        timeout_ms=40,
    )
    assert _stale(call, 0.0, "openai") is None
    refused = _stale(call, 0.1, "openai")
    assert refused is not None and refused.error_type == "expired_in_queue"
