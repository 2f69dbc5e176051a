"""Configuration: the guide's file loads unchanged, every invariant is checked, secrets stay out."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.contract import Price, TaskType
from vapora import pricing
from vapora.config import (
    DEFAULT_MAPPINGS,
    ENV_CONFIG,
    ENV_NATS_URL,
    Config,
    ProviderKind,
    api_key,
    apply_env,
    config_command,
    config_path,
    default_config,
    default_quality,
    http_url_problem,
    infer_kind,
    load,
    load_config,
    missing_api_key,
    parse_config,
    render_json,
    render_text,
)
from vapora.errors import ConfigError

FIXTURES = Path(__file__).parent.parent / "fixtures"
GUIDE_TOML = FIXTURES / "llm-router.toml"
SEED_TOML = Path(__file__).parents[3] / "shared" / "seed" / "llm-router.toml"
AT = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


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
    """A pricing stand-in so these tests do not depend on vapora.pricing's tables."""
    if input_per_mtok is not None and output_per_mtok is not None:
        inp, out = input_per_mtok, output_per_mtok
    elif cost_per_1k_tokens is not None:
        inp = out = cost_per_1k_tokens * 1000
    elif kind == "ollama":
        inp = out = Decimal(0)
    else:
        raise ConfigError(f"provider {provider!r}: no price known for model {model!r}")
    return Price(
        input_per_mtok=inp,
        output_per_mtok=out,
        cache_read_per_mtok=inp,
        cache_write_per_mtok=inp,
        source="test",
        version="1",
    )


BASE = """
[[providers]]
name = "claude"
api_key_env = "ANTHROPIC_API_KEY"
model = "claude-opus-4-5"
cost_per_1k_tokens = 0.015
timeout_ms = 30000

[[providers]]
name = "gemini"
model = "gemini-2.0-flash"
cost_per_1k_tokens = 0.005

[[providers]]
name = "ollama"
endpoint = "http://localhost:11434"
model = "llama2"
cost_per_1k_tokens = 0.0

[[routing_rules]]
task_type = "CodeGeneration"
primary_provider = "claude"
fallback_chain = ["gemini"]
"""


def parse(text: str) -> Config:
    return parse_config(text, source="test.toml", at=AT, resolve_price=flat_price)


def rejected(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.message


# --- the guide's file ---------------------------------------------------------------------------


def test_the_fixture_is_the_guides_file_unchanged() -> None:
    if not SEED_TOML.exists():
        pytest.skip("shared/seed is not beside this checkout")
    assert GUIDE_TOML.read_bytes() == SEED_TOML.read_bytes()


def test_the_guides_file_loads_with_kinds_urls_and_prices_resolved() -> None:
    config = load_config(GUIDE_TOML, at=AT)
    kinds = {p.name: p.kind for p in config.providers}
    assert kinds == {
        "claude": ProviderKind.ANTHROPIC,
        "openai": ProviderKind.OPENAI,
        "gemini": ProviderKind.GEMINI,
        "ollama": ProviderKind.OLLAMA,
    }
    claude, openai, gemini, ollama = config.providers
    assert claude.base_url == "https://api.anthropic.com"
    assert openai.base_url == "https://api.openai.com/v1"
    assert gemini.base_url == "https://generativelanguage.googleapis.com"
    assert ollama.base_url == "http://localhost:11434"
    assert claude.price.input_per_mtok == Decimal("15")
    assert openai.price.output_per_mtok == Decimal("30")
    assert ollama.zero_cost and not claude.zero_cost
    assert ollama.api_key_env is None
    assert [p.priority for p in config.providers] == [1, 2, 3, 4]


def test_the_guides_rules_and_budget_load_as_written() -> None:
    config = load_config(GUIDE_TOML, at=AT)
    assert config.mapping(TaskType.CODE_GENERATION) == ("claude", "openai", "gemini")
    assert config.mapping(TaskType.GENERAL_QUERY) == ("gemini", "ollama", "openai")
    assert config.budget.daily_limit_usd == Decimal(100)
    assert config.budget.monthly_limit_usd == Decimal(2500)
    assert config.budget.per_task_limit_usd == Decimal(10)
    assert config.budget.warn_threshold_percent == 90.0


def test_task_types_without_a_rule_use_the_guides_default_mapping() -> None:
    config = load_config(GUIDE_TOML, at=AT)
    architecture = TaskType.ARCHITECTURE_DESIGN
    assert config.mapping(architecture) == DEFAULT_MAPPINGS[architecture]
    assert config.mapping(TaskType.SECURITY_ANALYSIS) is None


def test_default_mappings_can_be_switched_off() -> None:
    config = parse(BASE + "\n[routing]\nuse_default_mappings = false\n")
    assert config.mapping(TaskType.ARCHITECTURE_DESIGN) is None
    assert config.mapping(TaskType.CODE_GENERATION) == ("claude", "gemini")


def test_the_context_overflow_fallback_is_on_by_default_and_can_be_switched_off() -> None:
    assert parse(BASE).routing.context_overflow_fallback is True
    off = parse(BASE + "\n[routing]\ncontext_overflow_fallback = false\n")
    assert off.routing.context_overflow_fallback is False
    with pytest.raises(ConfigError, match="context_overflow_fallback"):
        parse(BASE + '\n[routing]\ncontext_overflow_fallback = "yes"\n')
    _, text = config_command(None, as_json=False, env={})
    assert "an input too long for a model's context window: the next model" in text


def test_defaults_of_the_optional_sections() -> None:
    config = parse(BASE)
    weights = config.routing.weights
    assert (weights.quality, weights.cost, weights.latency) == (0.4, 0.3, 0.3)
    assert config.nats.urls == ()
    assert config.telemetry.exporter == "none" and config.telemetry.capture_content is False
    assert config.budget.daily_limit_cents is None
    assert config.storage.data_dir


def test_the_embedded_default_loads() -> None:
    config = default_config(at=AT, resolve_price=flat_price)
    assert config.source == "<embedded default>"
    assert {p.name for p in config.providers} == {"claude", "openai", "gemini", "ollama"}
    # Every task type the contract names is routed (SecurityAnalysis was a 404: the guide's
    # mappings have none for it).
    assert all(config.mapping(task_type) for task_type in TaskType)


def test_the_config_is_frozen() -> None:
    config = parse(BASE)
    with pytest.raises(AttributeError):
        config.providers[0].timeout_ms = 1  # type: ignore[misc]


# --- the extra keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("claude", ProviderKind.ANTHROPIC),
        ("anthropic-fast", ProviderKind.ANTHROPIC),
        ("openai", ProviderKind.OPENAI),
        ("google_flash", ProviderKind.GEMINI),
        ("gemini", ProviderKind.GEMINI),
        ("ollama-local", ProviderKind.OLLAMA),
        ("mistral", None),
        ("claude-vs-openai", None),
    ],
)
def test_kind_is_inferred_from_well_known_names(name: str, kind: ProviderKind | None) -> None:
    assert infer_kind(name) == kind


def test_explicit_keys_win_over_defaults() -> None:
    text = BASE.replace(
        'name = "gemini"',
        'name = "fast"\nkind = "openai"\nbase_url = "http://127.0.0.1:9000/v1/"\nquality = 0.33\n'
        "input_price_per_mtok = 1.25\noutput_price_per_mtok = 10",
    ).replace('fallback_chain = ["gemini"]', 'fallback_chain = ["fast"]')
    fast = parse(text).providers[1]
    assert fast.kind is ProviderKind.OPENAI
    assert fast.base_url == "http://127.0.0.1:9000/v1"
    assert fast.quality == 0.33
    assert (fast.price.input_per_mtok, fast.price.output_per_mtok) == (Decimal("1.25"), 10)
    assert fast.api_key_env == "OPENAI_API_KEY"


def test_default_quality_follows_the_guides_ladder() -> None:
    opus = default_quality(ProviderKind.ANTHROPIC, "claude-opus-4-5")
    sonnet = default_quality(ProviderKind.ANTHROPIC, "claude-sonnet-4-5")
    gpt4 = default_quality(ProviderKind.OPENAI, "gpt-4")
    flash = default_quality(ProviderKind.GEMINI, "gemini-2.0-flash")
    local = default_quality(ProviderKind.OLLAMA, "llama3:70b")
    assert opus > sonnet >= gpt4 > flash > local


def test_nats_accepts_one_url_or_a_list_and_credentials() -> None:
    text = BASE + (
        '\n[nats]\nurl = ["nats://a:4222", "tls://b:4222"]\nuser = "u"\npassword = "p"\n'
        '[nats.tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
    )
    nats = parse(text).nats
    assert nats.urls == ("nats://a:4222", "tls://b:4222")
    assert nats.tls is not None and nats.tls.ca == "ca.pem"
    assert parse(BASE + '\n[nats]\nurl = "nats://x:4222"\n').nats.urls == ("nats://x:4222",)


# --- every invariant, with the key path and the problem -----------------------------------------


def _second_rule(body: str) -> str:
    return BASE + f'\n[[routing_rules]]\ntask_type = "Documentation"\n{body}\n'


BAD = [
    ("unknown top-level key", "colour = 1\n" + BASE, "colour: unknown key"),
    (
        "unknown provider key",
        BASE.replace("timeout_ms = 30000", "tempo = 3"),
        "providers[0].tempo: unknown key",
    ),
    (
        "rule naming an unknown provider",
        BASE.replace('["gemini"]', '["gemini", "mistral"]'),
        "routing_rules[0].fallback_chain[1]: unknown provider 'mistral'",
    ),
    (
        "rule naming an unknown primary",
        _second_rule('primary_provider = "nobody"'),
        "routing_rules[1].primary_provider: unknown provider 'nobody'",
    ),
    (
        "provider twice in a chain",
        BASE.replace('["gemini"]', '["gemini", "claude"]'),
        "routing_rules[0].fallback_chain[1]: provider 'claude' appears twice",
    ),
    (
        "two rules for one task type",
        BASE + '\n[[routing_rules]]\ntask_type = "CodeGeneration"\nprimary_provider = "gemini"\n',
        "routing_rules[1].task_type: a second rule for CodeGeneration",
    ),
    (
        "unknown task type",
        _second_rule('primary_provider = "gemini"').replace("Documentation", "Poetry"),
        "routing_rules[1].task_type: invalid enum value 'Poetry'; one of CodeGeneration, "
        "CodeReview,",
    ),
    (
        "duplicate provider names",
        BASE.replace('name = "gemini"', 'name = "claude"'),
        "providers[1].name: duplicate provider name 'claude'",
    ),
    ("negative limit", BASE + "[budget]\ndaily_limit_cents = -5\n", "budget.daily_limit_cents"),
    ("zero limit", BASE + "[budget]\nper_task_limit_cents = 0\n", "budget.per_task_limit_cents"),
    ("NaN limit", BASE + "[budget]\nmonthly_limit_cents = nan\n", "budget.monthly_limit_cents"),
    # Past the contract's 10^15 USD no reservation or lease could carry the limit: every paid
    # request was a 500 (the keeper's and the router's messages refused it).
    (
        "limit past what a reservation carries",
        BASE + '[budget]\nper_task_limit_cents = "1e30"\n',
        "budget.per_task_limit_cents: must be at most 100,000,000,000,000,000",
    ),
    (
        "lease past what a lease carries",
        BASE + '[budget]\nlease_cents = "1e25"\n',
        "budget.lease_cents: must be at most",
    ),
    # A price so high that a call's cost could not be recorded: the call was billed and its
    # spend lost (its event refused).
    (
        "price past any model's",
        BASE.replace("cost_per_1k_tokens = 0.015", 'cost_per_1k_tokens = "1e20"'),
        "providers[0].cost_per_1k_tokens: must be at most 10",
    ),
    (
        "price per million past any model's",
        BASE.replace(
            "cost_per_1k_tokens = 0.015",
            'input_price_per_mtok = "1e999999"\noutput_price_per_mtok = 1',
        ),
        "providers[0].input_price_per_mtok: must be at most 10,000",
    ),
    # `$` matched before a last newline: the name passed, and `vapora up` died on the subject.
    (
        "provider name ending in a newline",
        BASE.replace('name = "gemini"', 'name = "gemini\\n"').replace(
            '["gemini"]', '["gemini\\n"]'
        ),
        "providers[1].name",
    ),
    (
        "warn threshold at 50",
        BASE + "[budget]\nwarn_threshold_percent = 50\n",
        "budget.warn_threshold_percent: must be in (50, 100]",
    ),
    (
        "warn threshold above 100",
        BASE + "[budget]\nwarn_threshold_percent = 100.5\n",
        "budget.warn_threshold_percent",
    ),
    (
        "task retention under an hour",
        BASE + "[budget]\ntask_retention_hours = 0.5\n",
        "budget.task_retention_hours: must be from 1 to 9600 (hours a task idle is kept), got 0.5",
    ),
    (
        "task retention not finite",
        BASE + "[budget]\ntask_retention_hours = inf\n",
        "budget.task_retention_hours: must be from 1 to 9600",
    ),
    (
        "weight outside 0-1",
        BASE + "[routing.weights]\nquality = 1.5\ncost = -0.25\nlatency = -0.25\n",
        "routing.weights.quality: must be between 0 and 1",
    ),
    (
        "weights not summing to 1",
        BASE + "[routing.weights]\nquality = 0.5\ncost = 0.3\nlatency = 0.3\n",
        "routing.weights: must sum to 1, got 1.1",
    ),
    (
        "required quality out of order",
        BASE + "[routing.required_quality]\nhigh = 0.5\n",
        "routing.required_quality.high: must not be below",
    ),
    (
        "quality outside 0-1",
        BASE.replace('model = "llama2"', 'model = "llama2"\nquality = 1.2'),
        "providers[2].quality: must be between 0 and 1, got 1.2",
    ),
    (
        "timeout of zero",
        BASE.replace('model = "llama2"', 'model = "llama2"\ntimeout_ms = 0'),
        "providers[2].timeout_ms: must be > 0, got 0",
    ),
    (
        "negative timeout",
        BASE.replace("timeout_ms = 30000", "timeout_ms = -5"),
        "providers[0].timeout_ms: must be > 0, got -5",
    ),
    (  # accepted, it overflowed the router's timer at run time
        "timeout past a day",
        BASE.replace("timeout_ms = 30000", "timeout_ms = 9223372036854775807"),
        "providers[0].timeout_ms: must be at most 86400000 (a day), got 9223372036854775807",
    ),
    (  # a reservation is held an hour at most: it would expire while the call still runs
        "timeout past 50 minutes",
        BASE.replace("timeout_ms = 30000", "timeout_ms = 3000001"),
        "providers[0].timeout_ms: must be at most 3000000 (50 minutes",
    ),
    (  # accepted, `vapora up` failed with a resolver traceback
        "metrics host that is no host",
        BASE + '[telemetry]\nprometheus_host = "no such host!!"\n',
        "telemetry.prometheus_host: must be an IP address or a host name, got 'no such host!!'",
    ),
    (
        "timeout of the wrong type",
        BASE.replace("timeout_ms = 30000", 'timeout_ms = "fast"'),
        "providers[0].timeout_ms: expected `int`, got `str`",
    ),
    (
        "rate limit of zero",
        BASE.replace("timeout_ms = 30000", "rate_limit_rpm = 0"),
        "providers[0].rate_limit_rpm",
    ),
    (
        "unknown kind",
        BASE.replace('name = "gemini"', 'name = "gemini"\nkind = "mistral"'),
        "providers[1].kind: unknown kind 'mistral'",
    ),
    (
        "kind that cannot be inferred",
        BASE.replace('name = "gemini"', 'name = "fast"').replace('["gemini"]', '["fast"]'),
        "providers[1].kind: cannot infer the kind from the name 'fast'",
    ),
    (
        "bad base URL",
        BASE.replace('endpoint = "http://localhost:11434"', 'base_url = "localhost:11434"'),
        "providers[2].base_url: 'localhost:11434' is not a valid URL",
    ),
    (
        "bad endpoint port",
        BASE.replace("localhost:11434", "localhost:99999"),
        "providers[2].endpoint: 'http://localhost:99999' is not a valid URL "
        "(its port is out of range 0-65535)",
    ),
    (
        "base_url and endpoint disagree",
        BASE.replace('model = "llama2"', 'model = "llama2"\nbase_url = "http://other:1"'),
        "providers[2].endpoint: is an alias of base_url",
    ),
    ("missing model", BASE.replace('model = "llama2"', ""), "providers[2].model: missing required"),
    (
        "name that breaks a NATS subject",
        BASE.replace('name = "ollama"', 'name = "ollama.local"'),
        "providers[2].name",
    ),
    (
        "negative blended price",
        BASE.replace("cost_per_1k_tokens = 0.005", "cost_per_1k_tokens = -0.005"),
        "providers[1].cost_per_1k_tokens",
    ),
    (
        "only an input price",
        BASE.replace("cost_per_1k_tokens = 0.005", "input_price_per_mtok = 1"),
        "providers[1]: give both input_price_per_mtok and output_price_per_mtok",
    ),
    (
        "paid provider with no known price",
        BASE.replace("cost_per_1k_tokens = 0.005", ""),
        "providers[1]: no usable price",
    ),
    ("no providers", "[budget]\ndaily_limit_cents = 5\n", "providers: at least one"),
    ("bad NATS URL", BASE + '[nats]\nurl = "http://x:4222"\n', "nats.url: 'http://x:4222'"),
    (
        "bad NATS URL in a list",
        BASE + '[nats]\nurl = ["nats://a:4222", "b:4222"]\n',
        "nats.url[1]",
    ),
    ("password without user", BASE + '[nats]\npassword = "p"\n', "nats.password: needs nats.user"),
    (
        "TLS cert without key",
        BASE + '[nats.tls]\ncert = "c.pem"\n',
        "nats.tls: give both cert and key",
    ),
    (
        "unknown exporter",
        BASE + '[telemetry]\nexporter = "jaeger"\n',
        "telemetry.exporter: invalid enum value 'jaeger'; one of none, console, otlp, jsonl",
    ),
    (
        "prometheus port out of range",
        BASE + "[telemetry]\nprometheus_port = 70000\n",
        "telemetry.prometheus_port",
    ),
    ("invalid TOML", BASE + "[budget\n", "invalid TOML"),
    # A NUL passed `vapora config` and stopped `vapora up` with a traceback from mkdir.
    (
        "NUL in the data directory",
        BASE + '[storage]\ndata_dir = "/tmp/a\\u0000b"\n',
        "storage.data_dir: must not hold a NUL",
    ),
    (
        "NUL in a TLS file",
        BASE + '[nats]\nurl = "tls://h:4222"\n[nats.tls]\nca = "/ca\\u0000.pem"\n',
        "nats.tls.ca: must not hold a NUL",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD, ids=[c[0] for c in BAD])
def test_a_bad_config_is_rejected_with_the_key_and_the_problem(
    case: str, text: str, expected: str
) -> None:
    message = rejected(text)
    assert message.lower().startswith(f"test.toml: {expected}".lower()), message


def test_the_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(BASE.replace("timeout_ms = 30000", "timeout_ms = -1"))
    with pytest.raises(ConfigError, match=r"router\.toml: providers\[0\]\.timeout_ms"):
        load_config(path, at=AT, resolve_price=flat_price)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml", at=AT)


def test_a_paid_provider_whose_price_the_resolver_does_not_know_is_rejected() -> None:
    def no_prices(kind: str, model: str, **_: object) -> Price:
        raise ConfigError(f"no price known for model {model!r}")

    with pytest.raises(ConfigError, match=r"providers\[0\]: no usable price: .*claude-opus-4-5"):
        parse_config(BASE, source="test.toml", at=AT, resolve_price=no_prices)


@given(
    st.tuples(
        st.floats(0, 1, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
    )
)
def test_weights_load_exactly_when_they_sum_to_one(weights: tuple[float, float, float]) -> None:
    q, c, lat = weights
    text = BASE + f"[routing.weights]\nquality = {q!r}\ncost = {c!r}\nlatency = {lat!r}\n"
    if math.isclose(q + c + lat, 1.0, abs_tol=1e-9):
        assert parse(text).routing.weights.quality == q
    else:
        assert "routing.weights" in rejected(text)


# --- environment --------------------------------------------------------------------------------


def test_config_path_flag_then_env_then_default() -> None:
    assert config_path("a.toml", {ENV_CONFIG: "b.toml"}) == "a.toml"
    assert config_path(None, {ENV_CONFIG: "b.toml"}) == "b.toml"
    assert config_path(None, {}) is None


def test_vapora_config_names_the_file_to_load() -> None:
    config = load(None, env={ENV_CONFIG: str(GUIDE_TOML)}, at=AT, resolve_price=flat_price)
    assert config.source == str(GUIDE_TOML)
    assert load(None, env={}, at=AT, resolve_price=flat_price).source == "<embedded default>"


def test_vapora_nats_url_overrides_the_file_and_the_flag_overrides_both() -> None:
    config = parse(BASE + '[nats]\nurl = "nats://file:4222"\n')
    env = {ENV_NATS_URL: "nats://a:4222, nats://b:4222"}
    assert apply_env(config, env).nats.urls == ("nats://a:4222", "nats://b:4222")
    assert apply_env(config, env, nats_url="nats://flag:1").nats.urls == ("nats://flag:1",)
    assert apply_env(config, {}).nats.urls == ("nats://file:4222",)


def test_a_bad_vapora_nats_url_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=ENV_NATS_URL):
        apply_env(parse(BASE), {ENV_NATS_URL: "http://nope"})


# --- secrets ------------------------------------------------------------------------------------


def test_api_keys_are_read_from_the_env_mapping_only() -> None:
    claude, _, ollama = parse(BASE).providers
    assert api_key(claude, {"ANTHROPIC_API_KEY": "sk-ant"}) == "sk-ant"
    assert api_key(claude, {"ANTHROPIC_API_KEY": ""}) is None
    assert api_key(ollama, {"ANTHROPIC_API_KEY": "sk-ant"}) is None
    assert missing_api_key(claude, {}) == "ANTHROPIC_API_KEY is not set"
    assert missing_api_key(ollama, {}) is None


def test_an_api_key_is_trimmed_and_one_no_header_can_carry_is_refused_unquoted() -> None:
    claude, _, _ = parse(BASE).providers
    assert api_key(claude, {"ANTHROPIC_API_KEY": " sk-ant-secret\n"}) == "sk-ant-secret"
    for bad in ("sk-ant secret", "sk-ant-secret\r\nX-Injected: 1", "sk-ant-sécret"):
        env = {"ANTHROPIC_API_KEY": bad}
        assert api_key(claude, env) is None
        reason = missing_api_key(claude, env)
        assert reason is not None and "ANTHROPIC_API_KEY holds" in reason
        assert "secret" not in reason and "sécret" not in reason
        assert "ANTHROPIC_API_KEY (unusable)" in render_text(parse(BASE), env)


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=30),
    st.sampled_from(["nats://{u}:{s}@h:4222", "tls://{u}:{s}@h", "nats://{s}@h:4222"]),
)
def test_no_nats_url_credential_appears_in_any_repr_render_or_error(secret: str, form: str) -> None:
    url = form.format(u="alice", s="pw" + secret)
    config = apply_env(parse(BASE), {ENV_NATS_URL: url})
    assert config.nats.urls == (url,)  # what connects is the URL as given
    shown = [repr(config), str(config), render_text(config, {}), render_json(config)]
    with pytest.raises(ConfigError) as bad_port:
        apply_env(parse(BASE), {ENV_NATS_URL: url.replace("@h", "@h:42x2", 1)})
    shown.append(str(bad_port.value))
    for text in shown:
        assert "pw" + secret not in text
    assert all("***@h" in text for text in shown)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=40))
def test_no_secret_appears_in_any_repr_or_render(secret: str) -> None:
    secret = "sk-" + secret
    config = parse(BASE + f'[nats]\nuser = "u"\npassword = "{secret}"\n')
    env = {"ANTHROPIC_API_KEY": secret, "GOOGLE_API_KEY": secret}
    for shown in (repr(config), str(config), render_text(config, env), render_json(config)):
        assert secret not in shown


@pytest.mark.parametrize("pasted", ["sk-ant-api03-CANARY", "sk-proj CANARY", "1ABC"])
def test_an_api_key_env_that_is_no_variable_name_is_refused_without_showing_it(
    pasted: str,
) -> None:
    # A key pasted where its variable's name goes was printed by `vapora config`, in a
    # warning, in health and routing events and in the callers' 503s ("key from $sk-...").
    message = rejected(
        BASE.replace('api_key_env = "ANTHROPIC_API_KEY"', f'api_key_env = "{pasted}"')
    )
    assert message.startswith("test.toml: providers[0].api_key_env: must be the name of")
    assert pasted not in message and "CANARY" not in message


def test_credentials_in_a_collector_url_are_masked_when_shown() -> None:
    text = '[telemetry]\notlp_endpoint = "https://otel.example/v1?api_key=CANARY2#x"\n'
    config = parse(BASE + text)
    for shown in (render_text(config, {}), render_json(config), repr(config)):
        assert "CANARY" not in shown, shown
    assert "api_key=***" in render_json(config)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://user:CANARY@gateway.example/v1", "must not hold a user or password"),
        ("https://gateway.example/v1?key=CANARY", "must not hold a query or a fragment"),
        ("https://gateway.example/v1#CANARY", "must not hold a query or a fragment"),
    ],
)
def test_a_provider_url_with_credentials_or_a_query_is_refused_unshown(url: str, said: str) -> None:
    """Neither was sent as meant: the user-info went nowhere, and a query came before the
    API's path (`/v1?key=K/chat/completions`, a review); both were taken without a word."""
    message = rejected(
        BASE.replace(
            'model = "gemini-2.0-flash"\n', f'model = "gemini-2.0-flash"\nbase_url = "{url}"\n'
        )
    )
    assert message.startswith("test.toml: providers[")
    assert ".base_url: " + said in message and "CANARY" not in message


# --- vapora config FILE -------------------------------------------------------------------------


def test_config_command_prints_what_the_guides_file_resolves_to() -> None:
    code, text = config_command(str(GUIDE_TOML), as_json=False, env={"ANTHROPIC_API_KEY": "k"})
    assert code == 0
    assert "claude: anthropic claude-opus-4-5 at https://api.anthropic.com" in text
    assert "ANTHROPIC_API_KEY (set)" in text and "OPENAI_API_KEY (missing)" in text
    assert "CodeGeneration      claude -> openai -> gemini" in text
    assert "SecurityAnalysis" in text and "unknown_task_type" in text
    assert "daily $100.00" in text
    # What `vapora config` left out or misread ("rate limit none rpm"; no leases, breaker,
    # replicas, sampling; "auth none" for credentials in the URL).
    assert "no rate limit" in render_text(parse(BASE), {})  # was "rate limit none rpm"
    assert "router leases up to $1.00" in text and "opens after 5 failures in a row" in text
    assert "event stream replicas 3 on a cluster, else 1" in text and "(sampled 1)" in text
    env = {"VAPORA_NATS_URL": "nats://svc:pw@h:4222"}
    _, in_url = config_command(str(GUIDE_TOML), as_json=False, env=env)
    assert "auth in the URL" in in_url and "pw@" not in in_url


def test_config_command_json_is_parseable_with_decimal_strings() -> None:
    code, text = config_command(str(GUIDE_TOML), as_json=True, env={ENV_NATS_URL: "nats://n:1"})
    assert code == 0
    data = json.loads(text)
    assert data["providers"][0]["price"]["input_per_mtok"] in ("15.000", "15")
    assert data["budget"]["daily_limit_cents"] == "10000"
    assert data["nats"]["urls"] == ["nats://n:1"]
    assert data["mappings"]["ArchitectureDesign"] == ["claude", "openai"]
    assert data["mappings"]["SecurityAnalysis"] is None


def test_config_command_exits_2_with_the_reason_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace('["gemini"]', '["mistral"]'))
    code, text = config_command(str(path), as_json=False, env={})
    assert code == 2
    assert str(path) in text
    assert "routing_rules[0].fallback_chain[0]: unknown provider 'mistral'" in text


def test_rendered_json_round_trips_into_the_config_structs() -> None:
    config = load_config(GUIDE_TOML, at=AT)
    data = json.loads(render_json(config))
    data.pop("mappings")
    assert msgspec.convert(data, Config) == config


# --- with vapora.pricing's maintained table -----------------------------------------------------


def test_a_model_in_the_price_table_needs_no_price_in_the_config() -> None:
    text = '[[providers]]\nname = "claude"\nmodel = "claude-sonnet-4-5"\n'
    text += '[[providers]]\nname = "ollama"\nmodel = "llama3"\n'
    claude, ollama = parse_config(text, source="t.toml", at=AT).providers
    assert claude.price.input_per_mtok > 0 and not claude.zero_cost
    assert ollama.zero_cost


def test_a_paid_model_with_no_known_price_is_a_config_error() -> None:
    text = '[[providers]]\nname = "claude"\nmodel = "claude-imaginary-9"\n'
    with pytest.raises(ConfigError, match=r"t\.toml: providers\[0\]: no usable price"):
        parse_config(text, source="t.toml", at=AT)


def test_the_embedded_servers_sync_interval_is_validated() -> None:
    from vapora.config import parse_config
    from vapora.errors import ConfigError as _ConfigError

    base = (FIXTURES / "llm-router.toml").read_text()
    ok = parse_config(base + '\n[storage]\nsync_interval = "always"\n', source="s.toml", at=AT)
    assert ok.storage.sync_interval == "always"
    with pytest.raises(_ConfigError, match=r"s.toml: storage.sync_interval: must be \"always\""):
        parse_config(base + '\n[storage]\nsync_interval = "often"\n', source="s.toml", at=AT)


def test_breaker_settings_are_per_provider_and_validated() -> None:
    from vapora.config import parse_config
    from vapora.errors import ConfigError as _ConfigError

    base = (FIXTURES / "llm-router.toml").read_text()
    tuned = base.replace(
        "rate_limit_rpm = 1000000\n", "rate_limit_rpm = 1000000\nbreaker_cooldown_ms = 2500\n", 1
    )
    config = parse_config(tuned, source="b.toml", at=AT)
    claude = config.provider("claude")
    assert claude is not None and claude.breaker_cooldown_ms == 2500
    assert claude.breaker_threshold == 5
    broken = base.replace(
        "rate_limit_rpm = 1000000\n", "rate_limit_rpm = 1000000\nbreaker_threshold = 0\n", 1
    )
    with pytest.raises(_ConfigError, match=r"providers\[0\].breaker_threshold: must be > 0"):
        parse_config(broken, source="b.toml", at=AT)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("nats://[::1", "an IPv6 address not closed with ']'"),  # (urlsplit's: a traceback)
        ("nats://h:99999", "its port is out of range 0-65535"),
        ("nats://h:4222\r\nINFO {}", "U+000D"),
        ("nats://h :4222", "U+0020"),
        ("ws://h:4222", "needs aiohttp"),  # offered, and failed 5 s later on an ImportError
    ],
)
def test_a_nats_url_vapora_cannot_use_is_a_config_error_naming_why(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        apply_env(parse(BASE), {ENV_NATS_URL: url})
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse(BASE + f"[nats]\nurl = {json.dumps(url)}\n")


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('base_url = "http://[::1"', "an IPv6 address not closed with ']'"),
        ('base_url = "http://127.0.0.1:1/v1\\r\\nX-Inj: 1\\r\\n"', "U+000D"),
        ('model = "claude-opus-4-5\\nforged log line"', "U+000A"),
        ('model = "claude-opus-4-5\\u0000"', "U+0000"),
    ],
)
def test_a_provider_url_or_model_with_a_control_character_is_refused(line: str, named: str) -> None:
    # A CR/LF base_url passed `vapora config` and stopped `vapora up` with a traceback; a model
    # name with one was printed raw by `vapora config` and `vapora ask`.
    key = line.partition(" ")[0]
    text = BASE.replace(
        'model = "claude-opus-4-5"',
        line if key == "model" else line + '\nmodel = "claude-opus-4-5"',
        1,
    )
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse(text)


def test_a_collector_endpoint_that_is_no_url_is_refused() -> None:
    # It passed `vapora config`; `vapora up` then logged a failed export for every batch.
    with pytest.raises(ConfigError, match=re.escape("telemetry.otlp_endpoint: 'not a url'")):
        parse(BASE + '[telemetry]\notlp_endpoint = "not a url"\n')
    assert parse(BASE + '[telemetry]\notlp_endpoint = "http://collector:4318"\n')


def test_a_password_in_a_url_may_hold_a_space_and_a_file_of_bare_crs_loads(
    tmp_path: Path,
) -> None:
    # Both worked before the URLs' and the file's checks were tightened, and must still.
    config = parse(BASE + '[nats]\nurl = "nats://user:pa ss@host:4222"\n')
    assert config.nats.urls == ("nats://user:pa ss@host:4222",)
    with pytest.raises(ConfigError, match="in its user-info \\(not shown\\)"):
        parse(BASE + '[nats]\nurl = "nats://user:pa\\rss@host:4222"\n')
    # A space before the scheme is no user-info's (it was taken, and every call then failed).
    with pytest.raises(ConfigError, match="U\\+0020 at 0"):
        parse(BASE.replace('endpoint = "http://localhost:11434"', 'endpoint = " http://u:p@h:1"'))
    crs = tmp_path / "cr.toml"
    crs.write_bytes(BASE.replace("\n", "\r").encode())
    assert [p.name for p in load_config(crs, at=AT).providers] == ["claude", "gemini", "ollama"]


def test_vapora_config_notes_the_long_context_rates_a_configured_price_leaves_out() -> None:
    text = """
[[providers]]
name = "gem"
kind = "gemini"
model = "gemini-2.5-pro"
api_key_env = "GEMINI_API_KEY"
input_price_per_mtok = 1.25
output_price_per_mtok = 10

[[providers]]
name = "table"
kind = "gemini"
model = "gemini-2.5-pro"
api_key_env = "GEMINI_API_KEY"
"""
    config = parse_config(text, source="t.toml", at=AT, resolve_price=pricing.resolve_price)
    shown = render_text(config, {}).splitlines()
    notes = [i for i, line in enumerate(shown) if line.strip().startswith("note:")]
    assert len(notes) == 1 and "200,000 input tokens" in shown[notes[0]]
    assert "gem:" in "\n".join(shown[: notes[0]]) and "table:" in shown[notes[0] + 1]


# --- OpenAI's service tier ----------------------------------------------------------------------

_OPENAI = (
    '\n[[providers]]\nname = "gpt"\nkind = "openai"\nmodel = "gpt-5"\ncost_per_1k_tokens = 0.01\n'
)


@pytest.mark.parametrize("tier", ["auto", "default", "flex", "priority", "scale"])
def test_an_openai_provider_takes_a_service_tier_to_send(tier: str) -> None:
    config = parse(BASE + _OPENAI + f'service_tier = "{tier}"\n')
    assert config.provider("gpt").service_tier == tier  # type: ignore[union-attr]
    assert config.provider("claude").service_tier is None  # type: ignore[union-attr]
    assert f"service tier {tier}" in render_text(config, {})


@pytest.mark.parametrize(
    ("where", "value", "said"),
    [
        ("gpt", "Priority", "providers[3].service_tier: must be one of auto, default, flex"),
        ("gpt", "fast", "providers[3].service_tier: must be one of auto, default, flex"),
        ("claude", "priority", "providers[0].service_tier: is an OpenAI setting; a provider of"),
    ],
)
def test_a_service_tier_openai_does_not_take_or_on_another_kind_is_refused(
    where: str, value: str, said: str
) -> None:
    text = BASE + _OPENAI
    if where == "gpt":
        text += f'service_tier = "{value}"\n'
    else:
        text = text.replace(
            "timeout_ms = 30000\n", f'timeout_ms = 30000\nservice_tier = "{value}"\n'
        )
    message = rejected(text)
    assert said in message, message
    assert message.startswith("test.toml: ")


@pytest.mark.parametrize(
    "url",
    [
        "nats://admin:hunter2#x@127.0.0.1:4222",
        "nats://admin:hunter2?x@127.0.0.1:4222",
        "nats://localhost:42707/hunter2@db.invalid:4222",
        "nats://u:hunter2/a b@host:4222",  # (the space's position was said)
    ],
)
def test_a_password_ending_the_host_early_is_refused_unshown(url: str) -> None:
    """urlsplit ends the host at a password's `/`, `?` or `#`: the password was read as a port
    and quoted in the error ("Port could not be cast to integer value as 'hunter2'"), or the
    URL connected to another host than the one shown, without credentials (a review)."""
    with pytest.raises(ConfigError) as info:
        apply_env(parse(BASE), {ENV_NATS_URL: url})
    message = info.value.message
    assert "holds an '@' after its host" in message, message
    assert "give it as [nats] user and password" in message
    assert "hunter2" not in message and " at " not in message.split("'")[-1]


def test_an_http_url_whose_password_ends_the_host_early_is_refused_unquoted() -> None:
    message = http_url_problem("https://u:hunter2#x@collector:4318") or ""
    assert message == "'https://u:***@collector:4318' is not a valid URL (its port is not a number)"
    position = http_url_problem("https://u:hunter2/a b@host") or ""
    assert "in its user-info (not shown)" in position and "hunter2" not in position


@pytest.mark.parametrize(
    "url",
    [
        "https://gateway.ai.cloudflare.com/v1/acct/gw/workers-ai/@cf/meta",
        "https://proxy.example.com/@team/v1",
    ],
)
def test_an_http_url_with_an_at_sign_in_its_path_is_taken(url: str) -> None:
    """A gateway's path may hold an `@` (Cloudflare's `/@cf/...`): refused for a while, in
    this session's first fix."""
    assert http_url_problem(url) is None
    text = BASE.replace(
        'model = "gemini-2.0-flash"\n', f'model = "gemini-2.0-flash"\nbase_url = "{url}"\n'
    )
    assert parse(text).provider("gemini").base_url == url  # type: ignore[union-attr]


def test_a_url_whose_port_is_no_number_is_refused_naming_that() -> None:
    with pytest.raises(ConfigError) as info:
        apply_env(parse(BASE), {ENV_NATS_URL: "nats://u:p@h:42x"})
    message = info.value.message
    assert "'nats://u:***@h:42x' is not a valid URL (its port is not a number)" in message
    assert "cast" not in message


def test_a_sync_interval_past_what_nats_server_reads_is_refused() -> None:
    """`vapora config` took "9999999h"; nats-server refused it at its start (a review)."""
    assert parse(BASE + '[storage]\nsync_interval = "2562047h"\n').storage.sync_interval
    message = rejected(BASE + '[storage]\nsync_interval = "2562048h"\n')
    assert "storage.sync_interval: must be at most 2562047h" in message
