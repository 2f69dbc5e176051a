"""The routing decision: the guide's order, every candidate's verdicts, the score, the chain."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.contract import (
    Candidate,
    CompletionRequest,
    FilterVerdict,
    Price,
    Quality,
    RouteDecision,
    TaskType,
    Tier,
)
from vapora.config import Config, missing_api_key, parse_config
from vapora.errors import BudgetExceeded, NoProviderAvailable, UnknownProvider, UnknownTaskType
from vapora.routing import (
    ProviderView,
    RouteOverBudget,
    RouteUnavailable,
    decide,
    remaining_usd,
    task_cap_usd,
)

GUIDE_TOML = Path(__file__).parent.parent / "fixtures" / "llm-router.toml"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ALL_KEYS = {"ANTHROPIC_API_KEY": "a", "OPENAI_API_KEY": "o", "GOOGLE_API_KEY": "g"}


def _key_views(config: Config, env: Mapping[str, str]) -> dict[str, ProviderView]:
    """Views knowing only whether each provider's API key is set in ``env`` (as a provider
    actor's health event tells a router)."""
    return {
        p.name: ProviderView(api_key_present=missing_api_key(p, env) is None)
        for p in config.providers
    }


def flat_price(
    kind: str,
    model: str,
    *,
    input_per_mtok: Decimal | None = None,
    output_per_mtok: Decimal | None = None,
    cost_per_1k_tokens: Decimal | None = None,
    at: datetime,
    provider: str | None = None,
) -> Price:
    """Prices straight from the config, so these tests do not depend on pricing tables."""
    if input_per_mtok is not None and output_per_mtok is not None:
        inp, out = input_per_mtok, output_per_mtok
    else:
        inp = out = (cost_per_1k_tokens or Decimal(0)) * 1000
    return Price(
        input_per_mtok=inp,
        output_per_mtok=out,
        cache_read_per_mtok=inp,
        cache_write_per_mtok=inp,
        source="test",
        version="1",
    )


def config_from(text: str) -> Config:
    return parse_config(text, source="test.toml", at=NOW, resolve_price=flat_price)


GUIDE = config_from(GUIDE_TOML.read_text())


def costs(config: Config, tokens: int = 2000) -> dict[str, Decimal]:
    """This request's estimate per provider: ``tokens`` in and out at the provider's price."""
    return {
        p.name: (p.price.input_per_mtok + p.price.output_per_mtok) * tokens / 1_000_000
        for p in config.providers
    }


def request(
    task_type: TaskType = TaskType.CODE_GENERATION,
    quality: Quality = Quality.HIGH,
    **fields: object,
) -> CompletionRequest:
    payload = {"task_type": task_type.value, "quality": quality.value, "prompt": "hi", **fields}
    return msgspec.convert(payload, CompletionRequest)


def route(
    req: CompletionRequest,
    config: Config = GUIDE,
    *,
    env: Mapping[str, str] = ALL_KEYS,
    views: Mapping[str, ProviderView] | None = None,
    tier: Tier = Tier.NORMAL,
    remaining: Decimal | None = None,
    estimates: Mapping[str, Decimal] | None = None,
) -> RouteDecision:
    return decide(
        req,
        config,
        now=NOW,
        views={**_key_views(config, env), **(views or {})},
        estimated_costs=costs(config) if estimates is None else estimates,
        tier=tier,
        task_remaining_usd=remaining,
    )


def candidate(decision: RouteDecision, name: str) -> Candidate:
    return next(c for c in decision.candidates if c.provider == name)


def verdict(decision: RouteDecision, name: str, filter_name: str) -> FilterVerdict:
    return next(v for v in candidate(decision, name).verdicts if v.filter == filter_name)


# --- the guide's real example and the cases ---------------------------------------------


def test_the_guides_example_goes_to_claude() -> None:
    """CodeGeneration, High quality, a 500-cent budget, every key present: Claude."""
    req = request(budget_cents=500, complexity=75, domain="backend", latency_required_ms=30000)
    decision = route(req, remaining=task_cap_usd(GUIDE, req))
    assert decision.chain[0] == "claude"
    assert decision.reason.startswith("claude for CodeGeneration at High quality")
    assert all(c.kept for c in decision.candidates)
    assert decision.tier is Tier.NORMAL


def test_an_override_goes_where_it_says_with_no_fallback() -> None:
    decision = route(request(provider="gemini"))
    assert decision.chain == ["gemini"]
    assert [c.provider for c in decision.candidates] == ["gemini"]
    assert "manual override" in decision.reason


def test_an_override_ignores_a_missing_mapping() -> None:
    assert route(request(TaskType.SECURITY_ANALYSIS, provider="openai")).chain == ["openai"]


def test_an_override_to_an_unknown_provider_is_404() -> None:
    with pytest.raises(UnknownProvider, match="'mistral'") as info:
        route(request(provider="mistral"))
    assert info.value.status == 404


def test_an_override_still_needs_its_api_key() -> None:
    with pytest.raises(RouteUnavailable, match="ANTHROPIC_API_KEY is not set"):
        route(request(provider="claude"), env={})


def test_a_provider_without_its_api_key_is_skipped_and_the_decision_says_why() -> None:
    env = {k: v for k, v in ALL_KEYS.items() if k != "ANTHROPIC_API_KEY"}
    decision = route(request(), env=env)
    # Without claude, gemini's shortfall at High (0.7 < 0.8) costs it less than gpt-4's 6x price.
    assert decision.chain == ["gemini", "openai", "ollama"]
    claude = candidate(decision, "claude")
    assert not claude.kept and claude.score is None
    assert verdict(decision, "claude", "availability") == FilterVerdict(
        filter="availability", passed=False, reason="ANTHROPIC_API_KEY is not set"
    )
    assert "claude (ANTHROPIC_API_KEY is not set)" in decision.reason


def test_a_task_type_with_no_mapping_is_404() -> None:
    with pytest.raises(UnknownTaskType, match="SecurityAnalysis") as info:
        route(request(TaskType.SECURITY_ANALYSIS))
    assert info.value.status == 404


def test_a_task_type_without_a_rule_uses_the_guides_default_mapping() -> None:
    decision = route(request(TaskType.ARCHITECTURE_DESIGN))
    assert [c.provider for c in decision.candidates] == ["claude", "openai", "ollama"]
    assert "guide's default mapping" in verdict(decision, "claude", "mapping").reason
    assert decision.chain[-1] == "ollama"


def test_a_default_mapping_naming_an_unconfigured_provider_records_it_as_dropped() -> None:
    config = config_from(
        '[[providers]]\nname = "claude"\nmodel = "claude-opus-4-5"\ncost_per_1k_tokens = 0.015\n'
    )
    decision = route(request(TaskType.CODE_GENERATION), config)
    assert decision.chain == ["claude"]
    assert verdict(decision, "ollama", "mapping").reason.endswith("not configured")


# --- availability -------------------------------------------------------------------------------


def test_a_rate_limited_provider_is_skipped_until_its_time() -> None:
    later = NOW + timedelta(seconds=30)
    limited = {"claude": ProviderView(rate_limited_until=later)}
    decision = route(request(), views=limited)
    assert "claude" not in decision.chain
    assert verdict(decision, "claude", "availability").reason.startswith("rate limited until")
    expired = {"claude": ProviderView(rate_limited_until=NOW - timedelta(seconds=1))}
    assert route(request(), views=expired).chain[0] == "claude"


def test_an_open_breaker_and_a_failing_health_check_drop_a_provider() -> None:
    views = {
        "claude": ProviderView(breaker_open=True),
        "openai": ProviderView(healthy=False, health_reason="connection refused"),
    }
    decision = route(request(), views=views)
    assert decision.chain == ["gemini", "ollama"]
    assert verdict(decision, "claude", "availability").reason == "circuit breaker open"
    assert "connection refused" in verdict(decision, "openai", "availability").reason


def test_every_candidate_unavailable_is_503_with_each_reason_and_the_decision() -> None:
    config = config_from(GUIDE_TOML.read_text() + "\n[routing]\nzero_cost_last_resort = false\n")
    with pytest.raises(NoProviderAvailable) as info:
        route(request(), config, env={})
    exc = info.value
    assert isinstance(exc, RouteUnavailable) and exc.status == 503
    for key in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY"):
        assert key in exc.message
    assert exc.decision.chain == []
    assert [c.provider for c in exc.decision.candidates] == ["claude", "openai", "gemini"]
    assert not any(c.kept for c in exc.decision.candidates)


# --- per-task budget ----------------------------------------------------------------------------


def test_a_candidate_whose_estimate_exceeds_the_tasks_remaining_budget_is_dropped() -> None:
    estimates = costs(GUIDE)  # claude 0.06, openai 0.12, gemini 0.02, ollama 0
    decision = route(request(), remaining=Decimal("0.05"), estimates=estimates)
    assert decision.chain == ["gemini", "ollama"]
    reason = verdict(decision, "claude", "budget").reason
    assert "exceeds the task's remaining $0.050000" in reason
    assert candidate(decision, "claude").estimated_cost_usd == estimates["claude"]


def test_the_requests_budget_lowers_the_task_cap_but_never_raises_it() -> None:
    assert task_cap_usd(GUIDE, request(budget_cents=500)) == Decimal(5)
    assert task_cap_usd(GUIDE, request(budget_cents=5000)) == Decimal(10)
    assert task_cap_usd(GUIDE, request()) == Decimal(10)
    spent = Decimal("4.5")
    cap = task_cap_usd(GUIDE, request(budget_cents=500))
    assert remaining_usd(cap, spent) == Decimal("0.5")
    assert remaining_usd(cap, Decimal(9)) == 0
    assert remaining_usd(None, spent) is None


def test_nothing_within_the_task_budget_is_402_with_the_decision() -> None:
    config = config_from(GUIDE_TOML.read_text() + "\n[routing]\nzero_cost_last_resort = false\n")
    with pytest.raises(BudgetExceeded) as info:
        route(request(), config, remaining=Decimal("0.001"))
    exc = info.value
    assert isinstance(exc, RouteOverBudget) and exc.status == 402
    assert {v.filter for c in exc.decision.candidates for v in c.verdicts if not v.passed} == {
        "budget"
    }


def test_a_candidate_without_a_cost_estimate_is_not_routed_blind() -> None:
    estimates = {k: v for k, v in costs(GUIDE).items() if k != "claude"}
    decision = route(request(), estimates=estimates)
    assert "claude" not in decision.chain
    assert verdict(decision, "claude", "budget").reason == "no cost estimate for this request"


# --- budget tiers -------------------------------------------------------------------------------


def test_near_threshold_prefers_the_cheapest_adequate_candidate() -> None:
    high = route(request(quality=Quality.HIGH), tier=Tier.NEAR_THRESHOLD)
    assert (
        high.chain[0] == "claude"
    )  # gemini (0.7) is below High (0.8); claude is cheaper than openai
    medium = route(request(quality=Quality.MEDIUM), tier=Tier.NEAR_THRESHOLD)
    assert medium.chain[:3] == ["gemini", "claude", "openai"]
    assert medium.tier is Tier.NEAR_THRESHOLD
    # Of the mapped candidates: the free last resort (ollama) comes after them whatever its
    # cost, and the reason said "the cheapest" of one dearer than it (a review).
    assert medium.chain[-1] == "ollama"
    assert "the cheapest adequate mapped candidate near the budget threshold" in medium.reason
    config = config_from(GUIDE_TOML.read_text() + "\n[routing]\nzero_cost_last_resort = false\n")
    alone = route(request(quality=Quality.MEDIUM), config, tier=Tier.NEAR_THRESHOLD)
    assert "the cheapest adequate candidate near the budget threshold" in alone.reason


def test_exceeded_admits_only_zero_cost_providers() -> None:
    decision = route(request(TaskType.GENERAL_QUERY), tier=Tier.EXCEEDED)
    assert decision.chain == ["ollama"]
    assert verdict(decision, "gemini", "tier").passed is False
    assert "Exceeded" in decision.reason


def test_exceeded_with_no_zero_cost_provider_available_is_402() -> None:
    views = {"ollama": ProviderView(healthy=False, health_reason="not running")}
    with pytest.raises(RouteOverBudget) as info:
        route(request(TaskType.GENERAL_QUERY), views=views, tier=Tier.EXCEEDED)
    assert info.value.decision.tier is Tier.EXCEEDED
    assert "not running" in info.value.message


# --- the chain's end ----------------------------------------------------------------------------


def test_the_zero_cost_provider_ends_the_chain_when_it_is_configured() -> None:
    decision = route(request())  # the CodeGeneration rule is claude, openai, gemini
    assert decision.chain[-1] == "ollama"
    assert verdict(decision, "ollama", "mapping").reason.startswith("zero-cost last resort")


OLLAMA_BLOCK = """[[providers]]
name = "ollama"
endpoint = "http://localhost:11434"
model = "llama2"
priority = 4
cost_per_1k_tokens = 0.0
timeout_ms = 10000
rate_limit_rpm = 10000000
"""
EMBEDDINGS_RULE = """[[routing_rules]]
task_type = "Embeddings"
primary_provider = "ollama"
fallback_chain = ["openai"]
"""


def test_a_paid_provider_ends_the_chain_only_when_no_zero_cost_one_is_configured() -> None:
    text = GUIDE_TOML.read_text()
    assert OLLAMA_BLOCK in text and EMBEDDINGS_RULE in text
    without_ollama = (
        text.replace(OLLAMA_BLOCK, "")
        .replace(EMBEDDINGS_RULE, "")
        .replace('["ollama", "openai"]', '["openai"]')
    )
    decision = route(request(), config_from(without_ollama))
    assert decision.chain == ["claude", "gemini", "openai"]


def test_the_last_resort_can_be_switched_off() -> None:
    config = config_from(GUIDE_TOML.read_text() + "\n[routing]\nzero_cost_last_resort = false\n")
    assert "ollama" not in route(request(), config).chain


def test_the_last_resort_is_chosen_when_no_mapped_candidate_is_kept() -> None:
    decision = route(request(), env={})
    assert decision.chain == ["ollama"]
    assert "no mapped candidate was kept" in decision.reason


# --- latency ------------------------------------------------------------------------------------


def test_candidates_too_slow_for_the_requirement_are_dropped_when_others_can_meet_it() -> None:
    views = {
        "claude": ProviderView(latency_ms=5000),
        "openai": ProviderView(latency_ms=4000),
        "gemini": ProviderView(latency_ms=300),
    }
    decision = route(request(latency_required_ms=1000), views=views)
    assert decision.chain == ["gemini", "ollama"]  # ollama has no observation yet
    assert "slower than the required 1000 ms" in verdict(decision, "claude", "latency").reason


def test_when_no_candidate_can_meet_the_latency_requirement_none_is_dropped_for_it() -> None:
    views = {n: ProviderView(latency_ms=5000) for n in ("claude", "openai", "gemini", "ollama")}
    decision = route(request(latency_required_ms=100), views=views)
    assert decision.chain[0] == "claude"
    assert verdict(decision, "gemini", "latency").reason == "no candidate meets 100 ms; kept"


# --- the score ----------------------------------------------------------------------------------


def three(qualities: tuple[float, float, float], extra: str = "") -> Config:
    """Three providers of one kind and price, differing only where a test says."""
    blocks = [
        f'[[providers]]\nname = "p{i}"\nkind = "openai"\nmodel = "m"\nquality = {q}\n'
        "cost_per_1k_tokens = 0.01\n"
        for i, q in enumerate(qualities)
    ]
    rule = '[[routing_rules]]\ntask_type = "CodeGeneration"\nprimary_provider = "p0"\n'
    rule += 'fallback_chain = ["p1", "p2"]\n'
    return config_from("".join(blocks) + rule + extra)


def test_each_candidates_own_quality_counts() -> None:
    decision = route(request(quality=Quality.MEDIUM), three((0.6, 0.9, 0.75)))
    assert decision.chain == ["p1", "p2", "p0"]


def test_a_candidate_below_the_requirement_loses_three_times_its_shortfall() -> None:
    config = three((0.9, 0.7, 0.9), "[routing.weights]\nquality = 1\ncost = 0\nlatency = 0\n")
    decision = route(request(quality=Quality.HIGH), config)
    assert candidate(decision, "p0").score == pytest.approx(0.9)
    assert candidate(decision, "p1").score == pytest.approx(0.7 - 3 * (0.8 - 0.7))


def test_a_cheaper_candidate_scores_higher_on_cost() -> None:
    estimates = {"p0": Decimal("0.03"), "p1": Decimal("0.01"), "p2": Decimal("0.02")}
    decision = route(request(), three((0.9, 0.9, 0.9)), estimates=estimates)
    assert decision.chain == ["p1", "p2", "p0"]
    assert candidate(decision, "p0").score == pytest.approx(0.4 * 0.9 + 0.3 * 0 + 0.3 * 1)


def test_a_faster_candidate_scores_higher_on_latency() -> None:
    views = {"p0": ProviderView(latency_ms=3000), "p2": ProviderView(latency_ms=200)}
    decision = route(request(), three((0.9, 0.9, 0.9)), views=views)
    assert decision.chain == ["p2", "p1", "p0"]  # p1 unknown: the median of the known
    # Equal costs: each is the dearest, so the cost term is 0 for all three.
    assert candidate(decision, "p2").score == pytest.approx(0.36 + 0 + 0.3 / 1.2)


def test_weights_are_configurable() -> None:
    cost_only = "\n[routing.weights]\nquality = 0\ncost = 1\nlatency = 0\n"
    config = config_from(GUIDE_TOML.read_text() + cost_only)
    assert route(request(), config).chain[0] == "gemini"


def test_the_decision_is_a_contract_value() -> None:
    decision = route(request(budget_cents=500))
    assert msgspec.json.decode(msgspec.json.encode(decision), type=RouteDecision) == decision


# --- properties ---------------------------------------------------------------------------------

VIEWS = st.builds(
    ProviderView,
    api_key_present=st.booleans(),
    rate_limited_until=st.none() | st.just(NOW + timedelta(seconds=5)),
    breaker_open=st.booleans(),
    healthy=st.booleans(),
    latency_ms=st.none() | st.floats(0, 60_000),
)
NAMES = [p.name for p in GUIDE.providers]
MAPPED = [t for t in TaskType if GUIDE.mapping(t) is not None]


@settings(max_examples=300, deadline=None)
@given(
    task_type=st.sampled_from(MAPPED),
    quality=st.sampled_from(list(Quality)),
    views=st.fixed_dictionaries({n: VIEWS for n in NAMES}),
    estimates=st.fixed_dictionaries(
        {n: st.decimals(0, 1, places=4) for n in NAMES if n != "ollama"}
    ),
    tier=st.sampled_from(list(Tier)),
    remaining=st.none() | st.decimals(0, 1, places=3),
    latency_required=st.none() | st.integers(1, 10_000),
)
def test_the_chain_is_exactly_the_kept_candidates_and_every_drop_has_a_reason(
    task_type: TaskType,
    quality: Quality,
    views: dict[str, ProviderView],
    estimates: dict[str, Decimal],
    tier: Tier,
    remaining: Decimal | None,
    latency_required: int | None,
) -> None:
    req = request(task_type, quality, latency_required_ms=latency_required)
    try:
        decision = decide(
            req,
            GUIDE,
            now=NOW,
            views=views,
            estimated_costs={**estimates, "ollama": Decimal(0)},
            tier=tier,
            task_remaining_usd=remaining,
        )
    except (RouteUnavailable, RouteOverBudget) as exc:
        decision = exc.decision
        assert decision.chain == [] and not any(c.kept for c in decision.candidates)
    kept = [c.provider for c in decision.candidates if c.kept]
    assert sorted(decision.chain) == sorted(kept)
    for c in decision.candidates:
        assert c.kept == all(v.passed for v in c.verdicts)
        assert c.kept or any(v.reason for v in c.verdicts if not v.passed)
        assert (c.score is not None) == c.kept
    if tier is Tier.EXCEEDED:
        assert all(GUIDE.provider(n).zero_cost for n in decision.chain)  # type: ignore[union-attr]


@settings(max_examples=100, deadline=None)
@given(order=st.permutations(["a", "b", "c", "d"]), tier=st.sampled_from(list(Tier)))
def test_equal_candidates_keep_the_mapping_order(order: list[str], tier: Tier) -> None:
    price = 0.0 if tier is Tier.EXCEEDED else 0.01
    blocks = "".join(
        f'[[providers]]\nname = "{n}"\nkind = "openai"\nmodel = "m"\ncost_per_1k_tokens = {price}\n'
        for n in "abcd"
    )
    rule = (
        f'[[routing_rules]]\ntask_type = "Documentation"\nprimary_provider = "{order[0]}"\n'
        f"fallback_chain = {order[1:]!r}\n".replace("'", '"')
    )
    config = config_from(blocks + rule)
    decision = route(request(TaskType.DOCUMENTATION), config, tier=tier)
    assert decision.chain == order


@settings(max_examples=200, deadline=None)
@given(
    views=st.fixed_dictionaries({n: VIEWS for n in NAMES}),
    task_type=st.sampled_from(MAPPED),
)
def test_in_the_exceeded_tier_no_paid_provider_is_ever_chosen(
    views: dict[str, ProviderView], task_type: TaskType
) -> None:
    try:
        decision = route(request(task_type), views=views, tier=Tier.EXCEEDED)
    except BudgetExceeded:
        return
    assert decision.chain == ["ollama"]


def test_a_cap_in_cents_is_its_exact_amount_in_usd_at_every_digit_a_request_may_give() -> None:
    # Divided by 100 at Python's default 28 digits, this cap came out as $0.01, above it.
    cents = Decimal("0.99999999999999999999999999999")
    assert task_cap_usd(GUIDE, request(budget_cents=cents)) == Decimal(
        "0.0099999999999999999999999999999"
    )


def _instance(name: str, *, available: bool, breaker: str, reason: str) -> object:
    from events.log import ProviderHealthChanged

    return ProviderHealthChanged(
        id=name, at=datetime(2026, 11, 27, tzinfo=UTC), provider="claude", available=available,
        reason=reason, breaker=breaker, instance=name,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("first", "second", "usable"),
    [
        # One unhealthy, the other's breaker open: no instance can take a call (it was taken
        # for available, a review).
        (("closed", False, "health check failed: 500"), ("open", False, "breaker open"), False),
        (("open", False, "breaker open"), ("closed", False, "health check failed: 500"), False),
        # One of them able to: available.
        (("closed", False, "health check failed: 500"), ("closed", True, "ok"), True),
        (("open", False, "breaker open"), ("half_open", True, "probing"), True),
        (("open", False, "breaker open"), ("closed", True, "ok"), True),
    ],
)
def test_a_provider_of_several_instances_is_available_while_one_can_take_a_call(
    first: tuple[str, bool, str], second: tuple[str, bool, str], usable: bool
) -> None:
    from vapora.routing import combined_view

    live = [
        _instance(name, breaker=breaker, available=available, reason=reason)
        for name, (breaker, available, reason) in (("a", first), ("b", second))
    ]
    view = combined_view(live, None)  # type: ignore[arg-type]
    assert (view.healthy and not view.breaker_open) is usable
    if not usable:
        assert (
            "health check failed: 500" in view.health_reason
            and "breaker open" in view.health_reason
        )
