"""vapora's configuration: one TOML file into frozen, typed, validated structs (DESIGN §5).

The guide's ``config/llm-router.toml`` loads unchanged; the extra keys are optional and default
sensibly. Loading goes in two steps: msgspec converts the TOML document into file-shaped structs
(wrong types and unknown keys are rejected there), then each section is checked and resolved
(provider kinds inferred, base URLs and qualities defaulted, prices resolved) into the public,
frozen structs below. Every failure is a :class:`~vapora.errors.ConfigError` whose message names
the file, the key path and the problem, e.g.
``llm-router.toml: providers[2].timeout_ms: must be > 0, got -5``.

Secrets: a provider names the environment variable that holds its key (``api_key_env``); the key
itself is read only by :func:`api_key` from an env mapping the caller passes, and is never stored
here. NATS passwords and tokens are masked in every repr and render.

Environment: ``VAPORA_CONFIG`` names the config file and ``VAPORA_NATS_URL`` replaces the NATS
URL(s); both are applied by functions that take the env mapping as a parameter (:func:`load`).
"""

from __future__ import annotations

import enum
import importlib.resources
import importlib.util
import ipaddress
import json
import math
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from events.contract import MAX_AMOUNT, Price, Quality, TaskType, cents_to_usd
from events.subjects import inbox_prefix
from vapora import pricing
from vapora.errors import ConfigError

__all__ = [
    "DEFAULT_MAPPINGS",
    "ENV_CONFIG",
    "ENV_NATS_PASSWORD",
    "ENV_NATS_URL",
    "ENV_NATS_USER",
    "BudgetConfig",
    "Config",
    "NatsConfig",
    "PriceResolver",
    "ProviderConfig",
    "ProviderKind",
    "RequiredQuality",
    "RoutingConfig",
    "RoutingRule",
    "ScoreWeights",
    "StorageConfig",
    "TelemetryConfig",
    "TlsConfig",
    "api_key",
    "apply_env",
    "config_command",
    "config_path",
    "default_config",
    "default_quality",
    "infer_kind",
    "key_not_set",
    "load",
    "load_config",
    "missing_api_key",
    "parse_config",
    "render_json",
    "render_text",
]

ENV_CONFIG: Final = "VAPORA_CONFIG"
ENV_NATS_URL: Final = "VAPORA_NATS_URL"
ENV_NATS_USER: Final = "VAPORA_NATS_USER"
ENV_NATS_PASSWORD: Final = "VAPORA_NATS_PASSWORD"
_MASK: Final = "***"


class ProviderKind(enum.StrEnum):
    """The wire protocol a provider speaks (which client vapora uses for it)."""

    ANTHROPIC = "anthropic"
    OPENAI = "openai"
    GEMINI = "gemini"
    OLLAMA = "ollama"


DEFAULT_BASE_URLS: Final[Mapping[ProviderKind, str]] = {
    ProviderKind.ANTHROPIC: "https://api.anthropic.com",
    ProviderKind.OPENAI: "https://api.openai.com/v1",
    ProviderKind.GEMINI: "https://generativelanguage.googleapis.com",
    ProviderKind.OLLAMA: "http://localhost:11434",
}

DEFAULT_API_KEY_ENV: Final[Mapping[ProviderKind, str | None]] = {
    ProviderKind.ANTHROPIC: "ANTHROPIC_API_KEY",
    ProviderKind.OPENAI: "OPENAI_API_KEY",
    ProviderKind.GEMINI: "GOOGLE_API_KEY",
    ProviderKind.OLLAMA: None,
}

_KIND_BY_NAME: Final[Mapping[str, ProviderKind]] = {
    "claude": ProviderKind.ANTHROPIC,
    "anthropic": ProviderKind.ANTHROPIC,
    "openai": ProviderKind.OPENAI,
    "gemini": ProviderKind.GEMINI,
    "google": ProviderKind.GEMINI,
    "ollama": ProviderKind.OLLAMA,
}

# First match wins, so the more specific names come first. The guide's quality ladder:
# Critical = Claude Opus; High = GPT-4, Claude Sonnet; Medium = GPT-3.5, Gemini Pro; Low = Ollama,
# Gemini Flash. Numbers sit against RequiredQuality's defaults (0.4 / 0.6 / 0.8 / 0.9).
_MODEL_QUALITY: Final[tuple[tuple[str, float], ...]] = (
    ("opus", 0.95),
    ("sonnet", 0.9),
    ("haiku", 0.7),
    ("nano", 0.6),
    ("mini", 0.7),
    ("gpt-3.5", 0.6),
    ("gpt-4", 0.85),
    ("gpt-5", 0.9),
    ("flash-lite", 0.6),
    ("flash", 0.7),
    ("pro", 0.85),
)
_KIND_QUALITY: Final[Mapping[ProviderKind, float]] = {
    ProviderKind.ANTHROPIC: 0.85,
    ProviderKind.OPENAI: 0.8,
    ProviderKind.GEMINI: 0.7,
    ProviderKind.OLLAMA: 0.5,
}

# The guide's ``default_mappings``: used for a task type that has no ``[[routing_rules]]`` entry.
# SecurityAnalysis has none, so without a rule it is an unknown task type (404).
DEFAULT_MAPPINGS: Final[Mapping[TaskType, tuple[str, ...]]] = {
    TaskType.CODE_GENERATION: ("claude", "openai", "ollama"),
    TaskType.CODE_REVIEW: ("claude", "openai"),
    TaskType.ARCHITECTURE_DESIGN: ("claude", "openai"),
    TaskType.DOCUMENTATION: ("openai", "claude"),
    TaskType.GENERAL_QUERY: ("gemini", "ollama"),
    TaskType.EMBEDDINGS: ("ollama", "openai"),
}

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+")  # a name is a NATS subject token (fullmatch)
_NATS_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
_HTTP_SCHEMES: Final = frozenset({"http", "https"})

PriceResolver = Callable[..., Price]
"""The signature of ``vapora.pricing.resolve_price(kind, model, *, input_per_mtok=None,
output_per_mtok=None, cost_per_1k_tokens=None, at) -> Price``; raises ConfigError when a paid
provider has no known price. Also passed: ``provider=`` (the configured name, for messages)."""


class _Invalid(Exception):
    """A problem at a key path; :func:`parse_config` adds the file name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config struct: immutable, keyword-only, unknown keys rejected."""


# --- public, resolved structs ------------------------------------------------------------------


class ProviderConfig(_Section, frozen=True, kw_only=True):
    """One provider, fully resolved: nothing here is optional that a client needs.

    ``price`` is the price in force when the config was loaded (for estimates and display);
    the cost of a call is computed with the price in force at the call's time.
    """

    name: str
    kind: ProviderKind
    model: str
    base_url: str
    api_key_env: str | None
    priority: int
    quality: float
    timeout_ms: int
    rate_limit_rpm: int | None
    price: Price
    cost_per_1k_tokens: Decimal | None = None
    input_price_per_mtok: Decimal | None = None
    output_price_per_mtok: Decimal | None = None
    breaker_threshold: int = 5
    breaker_cooldown_ms: int = 30_000
    #: OpenAI's ``service_tier`` sent with every call (None: not sent, the project's default).
    service_tier: str | None = None

    def __repr__(self) -> str:
        # A gateway's URL may carry credentials (user-info, a key in the query): masked.
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        fields["base_url"] = redact_url(self.base_url)
        return f"ProviderConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    __str__ = __repr__

    @property
    def zero_cost(self) -> bool:
        """True when every token is free (a local model)."""
        p = self.price
        prices = (
            p.input_per_mtok,
            p.output_per_mtok,
            p.cache_read_per_mtok,
            p.cache_write_per_mtok,
        )
        return all(x == 0 for x in prices)


class RoutingRule(_Section, frozen=True, kw_only=True):
    """A task type's mapping: the primary provider, then its fallback chain in order."""

    task_type: TaskType
    primary_provider: str
    fallback_chain: tuple[str, ...] = ()

    @property
    def chain(self) -> tuple[str, ...]:
        """The mapping in order: primary first."""
        return (self.primary_provider, *self.fallback_chain)


class BudgetConfig(_Section, frozen=True, kw_only=True):
    """Spending limits in cents, as in the guide (``None``: no such limit)."""

    daily_limit_cents: Decimal | None = None
    monthly_limit_cents: Decimal | None = None
    per_task_limit_cents: Decimal | None = None
    warn_threshold_percent: float = 90.0
    # The most one router's budget lease may hold (cents): routers admit paid attempts against
    # it without a round trip to the budget keeper. 0 turns leases off (one reservation each).
    lease_cents: Decimal = Decimal(100)
    # How long the budget keeper keeps a task that has had no event (its spend and cap).
    task_retention_hours: float = 24.0

    @property
    def task_retention(self) -> timedelta:
        """``task_retention_hours`` as a duration."""
        return timedelta(hours=self.task_retention_hours)

    @property
    def daily_limit_usd(self) -> Decimal | None:
        """The daily limit in USD."""
        return _usd(self.daily_limit_cents)

    @property
    def monthly_limit_usd(self) -> Decimal | None:
        """The monthly limit in USD."""
        return _usd(self.monthly_limit_cents)

    @property
    def per_task_limit_usd(self) -> Decimal | None:
        """The per-task limit in USD."""
        return _usd(self.per_task_limit_cents)

    @property
    def lease_usd(self) -> Decimal:
        """The largest budget lease in USD (0: leases off)."""
        return cents_to_usd(self.lease_cents)


class ScoreWeights(_Section, frozen=True, kw_only=True):
    """Weights of the score's terms; each in [0, 1], summing to 1 (the guide's 0.4/0.3/0.3)."""

    quality: float = 0.4
    cost: float = 0.3
    latency: float = 0.3


class RequiredQuality(_Section, frozen=True, kw_only=True):
    """The quality (0 to 1) each requirement level asks of a candidate; non-decreasing."""

    low: float = 0.4
    medium: float = 0.6
    high: float = 0.8
    critical: float = 0.9

    def level(self, quality: Quality) -> float:
        """The required quality for a request's ``quality``."""
        return {
            Quality.LOW: self.low,
            Quality.MEDIUM: self.medium,
            Quality.HIGH: self.high,
            Quality.CRITICAL: self.critical,
        }[quality]


class RoutingConfig(_Section, frozen=True, kw_only=True):
    """Knobs of the routing decision (see :mod:`vapora.routing` for how each is used).

    ``shortfall_penalty``: how much a candidate's quality term loses per unit of quality below the
    requirement, on top of its lower quality. ``use_default_mappings``: fall back to the guide's
    mappings for task types without a rule. ``zero_cost_last_resort``: append configured zero-cost
    providers that are not in a task's mapping to the end of its chain.
    ``context_overflow_fallback``: when a provider refuses the input as longer than its model's
    context window, try the chain's next provider with another model (a larger window may take
    it) instead of answering 502 at once; providers of a model that already refused it are
    skipped.
    """

    weights: ScoreWeights = msgspec.field(default_factory=ScoreWeights)
    required_quality: RequiredQuality = msgspec.field(default_factory=RequiredQuality)
    shortfall_penalty: float = 3.0
    use_default_mappings: bool = True
    zero_cost_last_resort: bool = True
    context_overflow_fallback: bool = True


class TlsConfig(_Section, frozen=True, kw_only=True):
    """TLS files for the NATS connection."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class NatsConfig(_Section, frozen=True, kw_only=True):
    """Where and how to connect to NATS. No URLs: ``vapora up`` starts the embedded server."""

    urls: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: TlsConfig | None = None
    # Where replies come back; None: ``_INBOX.<user>`` (events.subjects.inbox_prefix).
    inbox_prefix: str | None = None

    def __repr__(self) -> str:
        password = None if self.password is None else _MASK
        token = None if self.token is None else _MASK
        return (
            f"NatsConfig(urls={tuple(redact_url(u) for u in self.urls)!r}, "
            f"user={self.user!r}, password={password!r}, "
            f"token={token!r}, creds={self.creds!r}, tls={self.tls!r}, "
            f"inbox_prefix={self.inbox_prefix!r})"
        )

    __str__ = __repr__


class StorageConfig(_Section, frozen=True, kw_only=True):
    """Where the embedded server and the ledger keep their files, and how the embedded server
    syncs JetStream to disk: ``"always"`` (fsync before every acknowledgement: nothing
    acknowledged is lost even on power loss, at ~20x lower append throughput) or an interval
    such as ``"1s"`` (the default: a process crash loses nothing; an OS crash or power loss can
    lose the last interval of acknowledged events). See docs/operations.md."""

    data_dir: str = ".vapora"
    sync_interval: str = "1s"
    # The event stream's replicas; None: 3 on a clustered server, else 1 (actors.cluster).
    replicas: int | None = None


#: Where spans go: nowhere, the console, OTLP, or a JSON-lines file.
Exporter = Literal["none", "console", "otlp", "jsonl"]


class TelemetryConfig(_Section, frozen=True, kw_only=True):
    """OpenTelemetry and metrics switches (parsed here, applied by ``vapora.telemetry.setup``).

    ``exporter``: where spans go (``jsonl``: one JSON object per line to ``jsonl_path``);
    ``traces`` / ``metrics``: each on its own (metrics only: ``traces = false``);
    ``sample_ratio``: the share of new traces recorded (parent-based); ``prometheus_port``:
    serve ``/metrics`` there (on ``prometheus_host``); ``otlp_endpoint``: the collector
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` wins); ``capture_content``: prompts and completions on
    spans (opt-in; off by default). docs/observability.md has the whole list.
    """

    enabled: bool = False
    exporter: Exporter = "none"
    prometheus_port: int | None = None
    capture_content: bool = False
    traces: bool = True
    metrics: bool = True
    sample_ratio: float = 1.0
    jsonl_path: str | None = None
    otlp_endpoint: str | None = None
    prometheus_host: str = "0.0.0.0"  # a scrape endpoint is read from other hosts
    service_name: str | None = None
    # OTLP spans encoded and sent by a child process (vapora.telemetry.childexport) instead of
    # a thread of the process itself: less CPU and a steadier p99 in the actors' process, for
    # hosts with a core to spare.
    export_process: bool = False

    def __repr__(self) -> str:
        # The collector's URL may carry credentials (``https://user:token@host``): masked.
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        if self.otlp_endpoint is not None:
            fields["otlp_endpoint"] = redact_url(self.otlp_endpoint)
        return f"TelemetryConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    __str__ = __repr__


class Config(_Section, frozen=True, kw_only=True):
    """A whole, validated configuration. ``source`` is the file it came from."""

    source: str
    providers: tuple[ProviderConfig, ...]
    routing_rules: tuple[RoutingRule, ...] = ()
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)

    def provider(self, name: str) -> ProviderConfig | None:
        """The provider called ``name``, or None."""
        return next((p for p in self.providers if p.name == name), None)

    def rule(self, task_type: TaskType) -> RoutingRule | None:
        """The configured rule for ``task_type``, or None."""
        return next((r for r in self.routing_rules if r.task_type == task_type), None)

    def mapping(self, task_type: TaskType) -> tuple[str, ...] | None:
        """The task type's provider names in order: its rule, else the guide's default, else None.

        A default mapping may name providers that are not configured; routing records them as
        dropped.
        """
        rule = self.rule(task_type)
        if rule is not None:
            return rule.chain
        if self.routing.use_default_mappings:
            return DEFAULT_MAPPINGS.get(task_type)
        return None


# --- file-shaped structs (what the TOML may say) ------------------------------------------------


class _ProviderFile(_Section, frozen=True, kw_only=True):
    name: str
    model: str
    kind: str | None = None
    api_key_env: str | None = None
    base_url: str | None = None
    endpoint: str | None = None
    priority: int | None = None
    quality: float | None = None
    cost_per_1k_tokens: Decimal | None = None
    input_price_per_mtok: Decimal | None = None
    output_price_per_mtok: Decimal | None = None
    timeout_ms: int = 30_000
    rate_limit_rpm: int | None = None
    breaker_threshold: int = 5
    breaker_cooldown_ms: int = 30_000
    service_tier: str | None = None


class _NatsFile(_Section, frozen=True, kw_only=True):
    url: str | list[str] | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: TlsConfig | None = None
    inbox_prefix: str | None = None


class _ConfigFile(_Section, frozen=True, kw_only=True):
    providers: list[_ProviderFile] = []
    routing_rules: list[RoutingRule] = []
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    nats: _NatsFile = msgspec.field(default_factory=_NatsFile)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)


# --- small pure helpers -------------------------------------------------------------------------


def _usd(cents: Decimal | None) -> Decimal | None:
    return None if cents is None else cents_to_usd(cents)


def infer_kind(name: str) -> ProviderKind | None:
    """The kind named by a well-known word in ``name`` (``claude-fast`` → anthropic), or None."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    kinds = {_KIND_BY_NAME[w] for w in words if w in _KIND_BY_NAME}
    return kinds.pop() if len(kinds) == 1 else None


def default_quality(kind: ProviderKind, model: str) -> float:
    """A sensible quality (0 to 1) for a model when the config gives none."""
    if kind is ProviderKind.OLLAMA:
        return _KIND_QUALITY[kind]
    lowered = model.lower()
    match = next((q for word, q in _MODEL_QUALITY if word in lowered), None)
    return _KIND_QUALITY[kind] if match is None else match


#: A value in a URL (a query's, or any other `name=value`): up to the next `&`, `#`, `;`,
#: whitespace or `@` (so that an `@` after it still ends a user-info).
_URL_VALUE = re.compile(r"=[^&#;@\s]*")


def redact_url(url: str) -> str:
    """``url`` with its secrets masked, for anything shown, logged or raised: every value
    (``?api_key=***``, a collector's token) and the password of its user-info
    (``nats://user:***@host:4222``), or the whole user-info when it has no colon
    (``nats://***@host:4222``, a token). The values first, then everything up to the URL's
    last ``@`` counts as user-info: a password holding ``/``, ``?``, ``#`` or ``@`` is masked
    whole, whatever host follows; an ``@`` left in a path or a query masks more than it must,
    never less (earlier versions showed a password before a host of other characters, and a
    query's token after an ``@``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "=" in rest:
        rest = _URL_VALUE.sub(f"={_MASK}", rest)
    at = rest.rfind("@")
    if at < 0:
        return f"{scheme}{sep}{rest}"
    user, colon, _ = rest[:at].partition(":")
    masked = f"{user}:{_MASK}" if colon else _MASK
    return f"{scheme}{sep}{masked}{rest[at:]}"


def api_key(provider: ProviderConfig, env: Mapping[str, str]) -> str | None:
    """The provider's API key from ``env``, without surrounding whitespace (a trailing newline
    from ``$(cat keyfile)``); None if it needs none, the variable is unset or empty, or the key
    holds a character no API key has (a space, a control character, non-ASCII): such a key
    cannot go into a header as it is, and the server would quote back a different string than
    the one scrubbed from its errors. :func:`missing_api_key` says which."""
    if provider.api_key_env is None:
        return None
    key = (env.get(provider.api_key_env) or "").strip()
    if not key or not _header_safe(key):
        return None
    return key


def _header_safe(key: str) -> bool:
    return all("!" <= char <= "~" for char in key)  # printable ASCII, no space


def missing_api_key(provider: ProviderConfig, env: Mapping[str, str]) -> str | None:
    """Why the provider cannot authenticate (``ANTHROPIC_API_KEY is not set``); None if it can.
    Never quotes the key."""
    if provider.api_key_env is None or api_key(provider, env) is not None:
        return None
    if (env.get(provider.api_key_env) or "").strip():
        return (
            f"{provider.api_key_env} holds a space, a control or a non-ASCII character inside "
            "the key (not shown)"
        )
    return key_not_set(provider.api_key_env)


def key_not_set(variable: str) -> str:
    """Why a provider cannot authenticate when ``variable`` is unset: a provider actor's health
    reason, which routers read as the key missing (``ANTHROPIC_API_KEY is not set``)."""
    return f"{variable} is not set"


# --- checks -------------------------------------------------------------------------------------


_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_URL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _authority_end(url: str, start: int) -> int:
    """Where the URL's authority (``user:password@host:port``) ends: its first ``/``, ``?`` or
    ``#`` after ``start``, or the end."""
    ends = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    return min(ends) if ends else len(url)


def _check_url(path: str, url: str, schemes: frozenset[str]) -> str:
    allowed = "|".join(sorted(schemes - _NEEDS_AIOHTTP if not _has_aiohttp() else schemes))
    # A space is taken in the user-info (a password may hold one), nowhere else: the user-info
    # is what lies between `://` and the authority's last `@`.
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else -1
    at = url.rfind("@", start, _authority_end(url, start)) if start >= 0 else -1
    nats = url[: max(scheme_end, 0)].lower() in _NATS_SCHEMES
    if nats and at < 0 <= start and "@" in url[start:]:
        # A password holding `/`, `?` or `#` ends the authority there: the host is what came
        # before (`nats://h:1/pw@db:4222` connected to h:1, shown as going to db), or the
        # password was read as a port and quoted in the error (a review). Checked first: the
        # check below would say where in it a space is. (A NATS URL has no path: an HTTP
        # one's may hold an `@`, a gateway's `/@cf/...`.)
        raise _Invalid(
            path,
            f"{redact_url(url)!r} holds an '@' after its host: a user or password holding "
            "'/', '?' or '#' ends the host there; give it as [nats] user and password instead",
        )
    last_at = url.rfind("@", start) if start >= 0 else -1  # where user-info may end, at most
    unsafe = (
        _URL_UNSAFE.search(url, 0, start if at >= 0 else len(url))
        or (_URL_UNSAFE.search(url, at + 1) if at >= 0 else None)
        or _URL_CONTROL.search(url)
    )
    if unsafe is not None:  # a CR/LF passed the check and stopped `vapora up` with a traceback
        where = (
            "in its user-info (not shown)"  # nothing of a password is told, not even where
            if start <= unsafe.start() < max(at, last_at)
            else f"(U+{ord(unsafe.group()):04X} at {unsafe.start()})"
        )
        raise _Invalid(path, f"{redact_url(url)!r} holds a space or a control character {where}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:  # a bad port, or `[::1` (an IPv6 address left open)
        # Not the exception's text: it quotes the port as written.
        text = str(exc)
        why = (
            "an IPv6 address not closed with ']'"
            if "Invalid IPv6 URL" in text
            else "its port is out of range 0-65535"
            if "out of range" in text
            else "its port is not a number"
            if "could not be cast" in text
            else "its host or port cannot be read"
        )
        raise _Invalid(path, f"{redact_url(url)!r} is not a valid URL ({why})") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise _Invalid(
            path, f"{redact_url(url)!r} is not a valid URL (expected {allowed}://host[:port])"
        )
    if parts.scheme in _NEEDS_AIOHTTP and not _has_aiohttp():
        raise _Invalid(
            path,
            f"{redact_url(url)!r}: NATS over WebSocket needs aiohttp, which is not installed "
            "(pip install aiohttp), or use nats:// or tls://",
        )
    return url.rstrip("/")


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an ``http(s)://host[:port]`` URL (its password never shown), or None:
    the check of the file's ``telemetry.otlp_endpoint``, for a variable that names one."""
    try:
        _check_url("", url, _HTTP_SCHEMES)
    except _Invalid as exc:
        return exc.problem
    return None


#: URL schemes nats-py reaches only through aiohttp (not a dependency of vapora).
_NEEDS_AIOHTTP: Final = frozenset({"ws", "wss"})


def _has_aiohttp() -> bool:
    return importlib.util.find_spec("aiohttp") is not None


def _check_unit(path: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise _Invalid(path, f"must be between 0 and 1, got {value}")


#: The largest budget amount a config may name, in cents: the contract's bound on an amount
#: (10^15 USD); past it a limit could not be sent in a reservation or a lease.
MAX_CENTS = MAX_AMOUNT * 100
#: The largest price per million tokens a config may name (USD): 10,000, over ten times the
#: dearest model sold. With every token count a provider may report (2^53 each), no call's cost
#: then passes the contract's bound, so every call's spend can be recorded.
MAX_PRICE_PER_MTOK = Decimal(10_000)


def _check_money(
    path: str, value: Decimal | None, *, positive: bool = False, most: Decimal = MAX_CENTS
) -> None:
    if value is None:
        return
    if not value.is_finite() or value < 0 or (positive and value == 0):
        bound = "> 0 (omit the key for no limit)" if positive else ">= 0"
        raise _Invalid(path, f"must be a finite number {bound}, got {value}")
    if value > most:
        raise _Invalid(path, f"must be at most {most:,f}, got {value}")


#: The longest duration a ``*_ms`` key may give: a day (past it, timers overflow).
MAX_MS = 86_400_000
#: The longest provider call: a reservation, held past the call's whole life, lasts an hour at
#: most (the contract's bound on ``BudgetReserve.ttl_s``).
MAX_TIMEOUT_MS = 3_000_000


def _check_positive_int(path: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise _Invalid(path, f"must be > 0, got {value}")


def _check_ms(path: str, value: int | None) -> None:
    _check_positive_int(path, value)
    if value is not None and value > MAX_MS:
        raise _Invalid(path, f"must be at most {MAX_MS} (a day), got {value}")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host(path: str, host: str) -> None:
    """An IP address or a host name (RFC 1123 labels); the name is not looked up here."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _Invalid(path, f"must be an IP address or a host name, got {host!r}")


# --- resolution of each section -----------------------------------------------------------------


def _kind(path: str, raw: _ProviderFile) -> ProviderKind:
    if raw.kind is not None:
        try:
            return ProviderKind(raw.kind)
        except ValueError:
            allowed = "|".join(k.value for k in ProviderKind)
            raise _Invalid(
                f"{path}.kind", f"unknown kind {raw.kind!r} (expected {allowed})"
            ) from None
    kind = infer_kind(raw.name)
    if kind is None:
        allowed = "|".join(k.value for k in ProviderKind)
        problem = f"cannot infer the kind from the name {raw.name!r}; set kind = {allowed}"
        raise _Invalid(f"{path}.kind", problem)
    return kind


def _base_url(path: str, raw: _ProviderFile, kind: ProviderKind) -> str:
    if raw.base_url is not None and raw.endpoint is not None and raw.base_url != raw.endpoint:
        raise _Invalid(f"{path}.endpoint", "is an alias of base_url; give one, not both")
    given = raw.base_url if raw.base_url is not None else raw.endpoint
    key = "base_url" if raw.base_url is not None else "endpoint"
    if given is None:
        return DEFAULT_BASE_URLS[kind]
    url = _check_url(f"{path}.{key}", given, _HTTP_SCHEMES)
    # Neither was ever sent as meant: the user-info went nowhere (no Basic auth), and a query
    # ended up before the API's path (`/v1?key=K/chat/completions`, a review).
    start = url.find("://") + 3
    if "@" in url[start : _authority_end(url, start)]:
        raise _Invalid(
            f"{path}.{key}",
            "must not hold a user or password (not shown): vapora does not send them; the "
            "provider's key goes in the variable api_key_env names",
        )
    if "?" in url or "#" in url:
        raise _Invalid(
            f"{path}.{key}",
            "must not hold a query or a fragment: vapora adds the API's path after the base "
            "URL, which would put it inside the query",
        )
    return url


def _check_provider_scalars(path: str, raw: _ProviderFile) -> None:
    if not _NAME_RE.fullmatch(raw.name):
        raise _Invalid(f"{path}.name", f"{raw.name!r} must be letters, digits, '-' or '_'")
    if not raw.model.strip():
        raise _Invalid(f"{path}.model", "must not be empty")
    unsafe = _URL_UNSAFE.search(raw.model)
    if unsafe is not None:  # it goes into request URLs (Gemini's path), events and log lines
        raise _Invalid(
            f"{path}.model",
            f"must not hold a space or a control character (U+{ord(unsafe.group()):04X} at "
            f"{unsafe.start()})",
        )
    if raw.api_key_env is not None and not _ENV_NAME.fullmatch(raw.api_key_env):
        # Not echoed: a key pasted here instead of its variable's name would be printed in
        # every message, health event and decision that names the variable.
        raise _Invalid(
            f"{path}.api_key_env",
            "must be the name of an environment variable (letters, digits and _, not starting "
            "with a digit); the value is not shown, in case it is the key itself",
        )
    if raw.quality is not None:
        _check_unit(f"{path}.quality", raw.quality)
    _check_ms(f"{path}.timeout_ms", raw.timeout_ms)
    if raw.timeout_ms is not None and raw.timeout_ms > MAX_TIMEOUT_MS:
        raise _Invalid(
            f"{path}.timeout_ms",
            f"must be at most {MAX_TIMEOUT_MS} (50 minutes: a call's budget reservation is "
            f"held an hour at most), got {raw.timeout_ms}",
        )
    _check_positive_int(f"{path}.rate_limit_rpm", raw.rate_limit_rpm)
    _check_positive_int(f"{path}.breaker_threshold", raw.breaker_threshold)
    _check_ms(f"{path}.breaker_cooldown_ms", raw.breaker_cooldown_ms)
    if raw.priority is not None and raw.priority < 0:
        raise _Invalid(f"{path}.priority", f"must be >= 0, got {raw.priority}")
    for key in ("cost_per_1k_tokens", "input_price_per_mtok", "output_price_per_mtok"):
        most = MAX_PRICE_PER_MTOK / (1000 if key == "cost_per_1k_tokens" else 1)
        _check_money(f"{path}.{key}", getattr(raw, key), most=most)
    if (raw.input_price_per_mtok is None) != (raw.output_price_per_mtok is None):
        raise _Invalid(path, "give both input_price_per_mtok and output_price_per_mtok, or neither")


def _price(
    path: str, raw: _ProviderFile, kind: ProviderKind, at: datetime, resolve: PriceResolver
) -> Price:
    try:
        return resolve(
            kind.value,
            raw.model,
            input_per_mtok=raw.input_price_per_mtok,
            output_per_mtok=raw.output_price_per_mtok,
            cost_per_1k_tokens=raw.cost_per_1k_tokens,
            at=at,
            provider=raw.name,
        )
    except ConfigError as exc:
        raise _Invalid(path, f"no usable price: {exc.message}") from exc


def _provider(
    index: int, raw: _ProviderFile, at: datetime, resolve: PriceResolver
) -> ProviderConfig:
    path = f"providers[{index}]"
    _check_provider_scalars(path, raw)
    kind = _kind(path, raw)
    return ProviderConfig(
        name=raw.name,
        kind=kind,
        model=raw.model,
        base_url=_base_url(path, raw, kind),
        api_key_env=raw.api_key_env if raw.api_key_env is not None else DEFAULT_API_KEY_ENV[kind],
        priority=raw.priority if raw.priority is not None else index + 1,
        quality=raw.quality if raw.quality is not None else default_quality(kind, raw.model),
        timeout_ms=raw.timeout_ms,
        rate_limit_rpm=raw.rate_limit_rpm,
        price=_price(path, raw, kind, at, resolve),
        cost_per_1k_tokens=raw.cost_per_1k_tokens,
        input_price_per_mtok=raw.input_price_per_mtok,
        output_price_per_mtok=raw.output_price_per_mtok,
        breaker_threshold=raw.breaker_threshold,
        breaker_cooldown_ms=raw.breaker_cooldown_ms,
        service_tier=_service_tier(path, raw, kind),
    )


def _service_tier(path: str, raw: _ProviderFile, kind: ProviderKind) -> str | None:
    """OpenAI's ``service_tier`` as the API takes it; an error for another kind (none reads it)
    or a value the API does not take."""
    if raw.service_tier is None:
        return None
    if kind is not ProviderKind.OPENAI:
        raise _Invalid(
            f"{path}.service_tier",
            f"is an OpenAI setting; a provider of kind {kind.value!r} takes none",
        )
    if raw.service_tier not in pricing.REQUEST_TIERS:
        raise _Invalid(
            f"{path}.service_tier",
            f"must be one of {', '.join(pricing.REQUEST_TIERS)}, got {raw.service_tier[:40]!r}",
        )
    return raw.service_tier


def _providers(
    raws: list[_ProviderFile], at: datetime, resolve: PriceResolver
) -> tuple[ProviderConfig, ...]:
    if not raws:
        raise _Invalid("providers", "at least one [[providers]] entry is required")
    seen: dict[str, int] = {}
    for index, raw in enumerate(raws):
        if raw.name in seen:
            raise _Invalid(
                f"providers[{index}].name",
                f"duplicate provider name {raw.name!r} (also providers[{seen[raw.name]}])",
            )
        seen[raw.name] = index
    return tuple(_provider(i, raw, at, resolve) for i, raw in enumerate(raws))


def _check_rule(index: int, rule: RoutingRule, names: set[str]) -> None:
    path = f"routing_rules[{index}]"
    keys = ["primary_provider"] + [f"fallback_chain[{i}]" for i in range(len(rule.fallback_chain))]
    seen: set[str] = set()
    for key, name in zip(keys, rule.chain, strict=True):
        if name not in names:
            known = ", ".join(sorted(names))
            raise _Invalid(f"{path}.{key}", f"unknown provider {name!r} (configured: {known})")
        if name in seen:
            raise _Invalid(f"{path}.{key}", f"provider {name!r} appears twice in the chain")
        seen.add(name)


def _check_rules(rules: list[RoutingRule], providers: tuple[ProviderConfig, ...]) -> None:
    names = {p.name for p in providers}
    seen: dict[TaskType, int] = {}
    for index, rule in enumerate(rules):
        if rule.task_type in seen:
            first = f"routing_rules[{seen[rule.task_type]}]"
            problem = f"a second rule for {rule.task_type.value} (the first is {first})"
            raise _Invalid(f"routing_rules[{index}].task_type", problem)
        seen[rule.task_type] = index
        _check_rule(index, rule, names)


_MAX_TASK_RETENTION_HOURS = 24 * 400  # a year and a bit: past it, nothing is ever forgotten


def _check_budget(budget: BudgetConfig) -> None:
    for key in ("daily_limit_cents", "monthly_limit_cents", "per_task_limit_cents"):
        _check_money(f"budget.{key}", getattr(budget, key), positive=True)
    warn = budget.warn_threshold_percent
    if not (math.isfinite(warn) and 50 < warn <= 100):
        raise _Invalid("budget.warn_threshold_percent", f"must be in (50, 100], got {warn}")
    _check_money("budget.lease_cents", budget.lease_cents)
    hours = budget.task_retention_hours
    if not (math.isfinite(hours) and 1 <= hours <= _MAX_TASK_RETENTION_HOURS):
        raise _Invalid(
            "budget.task_retention_hours",
            f"must be from 1 to {_MAX_TASK_RETENTION_HOURS} (hours a task idle is kept), "
            f"got {hours:g}",
        )


def _check_routing(routing: RoutingConfig) -> None:
    weights = routing.weights
    for key in ("quality", "cost", "latency"):
        _check_unit(f"routing.weights.{key}", getattr(weights, key))
    total = weights.quality + weights.cost + weights.latency
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise _Invalid("routing.weights", f"must sum to 1, got {total:g}")
    levels = routing.required_quality
    previous = 0.0
    for key in ("low", "medium", "high", "critical"):
        value = getattr(levels, key)
        _check_unit(f"routing.required_quality.{key}", value)
        if value < previous:
            raise _Invalid(
                f"routing.required_quality.{key}", "must not be below the level under it"
            )
        previous = value
    penalty = routing.shortfall_penalty
    if not (math.isfinite(penalty) and penalty >= 0):
        raise _Invalid("routing.shortfall_penalty", f"must be >= 0, got {penalty}")


def _nats_urls(path: str, url: str | list[str] | None) -> tuple[str, ...]:
    if url is None:
        return ()
    if isinstance(url, str):
        return (_check_url(path, url, _NATS_SCHEMES),)
    if not url:
        raise _Invalid(path, "must not be an empty list (omit it for the embedded server)")
    return tuple(_check_url(f"{path}[{i}]", u, _NATS_SCHEMES) for i, u in enumerate(url))


def _nats(raw: _NatsFile) -> NatsConfig:
    if raw.password is not None and raw.user is None:
        raise _Invalid("nats.password", "needs nats.user")
    if raw.token is not None and raw.user is not None:
        raise _Invalid("nats.token", "give a token or a user and password, not both")
    tls = raw.tls
    if tls is not None and (tls.cert is None) != (tls.key is None):
        raise _Invalid("nats.tls", "give both cert and key, or neither")
    _check_path("nats.creds", raw.creds)
    if tls is not None:
        for name in ("ca", "cert", "key"):
            _check_path(f"nats.tls.{name}", getattr(tls, name))
    return NatsConfig(
        urls=_nats_urls("nats.url", raw.url),
        user=raw.user,
        password=raw.password,
        token=raw.token,
        creds=raw.creds,
        tls=tls,
        inbox_prefix=_inbox_prefix(raw.inbox_prefix),
    )


# Subject tokens: no whitespace, no wildcard, no empty token.
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def _inbox_prefix(prefix: str | None) -> str | None:
    if prefix is not None and _SUBJECT.fullmatch(prefix) is None:
        raise _Invalid(
            "nats.inbox_prefix",
            f'{prefix!r} is not a NATS subject without wildcards (e.g. "_INBOX.billing")',
        )
    if prefix is not None and (prefix.startswith("$") or prefix.split(".")[0] == "vapora"):
        # vapora's own subjects (the event log's among them) and the system's are never
        # answered to: every request would wait out its timeout.
        raise _Invalid(
            "nats.inbox_prefix",
            f"{prefix!r} is under vapora's own or the system's subjects, which no answer is "
            'sent to; use one of its own (e.g. "_INBOX.billing")',
        )
    return prefix


_SYNC_INTERVAL = re.compile(r"always|[1-9][0-9]*(ms|s|m|h)")
#: The longest duration nats-server reads (Go's ``time.Duration``: 2^63 - 1 ns): a longer
#: sync_interval passed `vapora config` and stopped the server's start.
_MAX_DURATION_NS = 2**63 - 1
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def _duration_ns(text: str) -> int:
    """A ``_SYNC_INTERVAL`` duration in nanoseconds (``always``: 0)."""
    if text == "always":
        return 0
    match = _SYNC_INTERVAL.fullmatch(text)
    assert match is not None and match.group(1) is not None
    unit = match.group(1)
    return int(text[: -len(unit)]) * _UNIT_NS[unit]


def _tls_said(nats: NatsConfig) -> str:
    if nats.tls is None:
        return "no"
    if not nats.urls:  # (a URL may still come from --nats-url or VAPORA_NATS_URL)
        return "yes, for a NATS URL only (the embedded server has none: it refuses to start)"
    return "yes"


def _check_path(path: str, value: str | None) -> None:
    """A file or directory name: no NUL (no system call takes one: it passed ``vapora config``
    and stopped ``vapora up`` with a traceback)."""
    if value is not None and "\x00" in value:
        raise _Invalid(path, "must not hold a NUL character")


def _check_misc(storage: StorageConfig, telemetry: TelemetryConfig) -> None:
    if not storage.data_dir.strip():
        raise _Invalid("storage.data_dir", "must not be empty")
    _check_path("storage.data_dir", storage.data_dir)
    _check_path("telemetry.jsonl_path", telemetry.jsonl_path)
    if not _SYNC_INTERVAL.fullmatch(storage.sync_interval):
        raise _Invalid(
            "storage.sync_interval",
            f'must be "always" or a duration such as "500ms", "1s", "2m"; '
            f"got {storage.sync_interval!r}",
        )
    if _duration_ns(storage.sync_interval) > _MAX_DURATION_NS:
        raise _Invalid(
            "storage.sync_interval",
            f"must be at most 2562047h (nats-server's longest duration), got "
            f"{storage.sync_interval!r}",
        )
    if storage.replicas is not None and not 1 <= storage.replicas <= 5:
        raise _Invalid("storage.replicas", f"must be in 1..5, got {storage.replicas}")
    port = telemetry.prometheus_port
    if port is not None and not 1 <= port <= 65535:
        raise _Invalid("telemetry.prometheus_port", f"must be in 1..65535, got {port}")
    _check_host("telemetry.prometheus_host", telemetry.prometheus_host)
    if not 0.0 <= telemetry.sample_ratio <= 1.0:
        raise _Invalid("telemetry.sample_ratio", f"must be in 0..1, got {telemetry.sample_ratio}")
    if telemetry.exporter == "jsonl" and not telemetry.jsonl_path:
        raise _Invalid("telemetry.jsonl_path", 'is required with exporter = "jsonl"')
    if telemetry.otlp_endpoint is not None:  # "not a url" failed every export, once started
        _check_url("telemetry.otlp_endpoint", telemetry.otlp_endpoint, _HTTP_SCHEMES)


def _resolve(doc: _ConfigFile, source: str, at: datetime, resolve: PriceResolver) -> Config:
    providers = _providers(doc.providers, at, resolve)
    _check_rules(doc.routing_rules, providers)
    _check_budget(doc.budget)
    _check_routing(doc.routing)
    _check_misc(doc.storage, doc.telemetry)
    return Config(
        source=source,
        providers=providers,
        routing_rules=tuple(doc.routing_rules),
        budget=doc.budget,
        routing=doc.routing,
        nats=_nats(doc.nats),
        storage=doc.storage,
        telemetry=doc.telemetry,
    )


# --- loading ------------------------------------------------------------------------------------


# The values a key of a fixed set takes, said with a value it does not.
_CHOICES: dict[str, tuple[str, ...]] = {
    "task_type": tuple(t.value for t in TaskType),
    "kind": tuple(k.value for k in ProviderKind),
    "exporter": typing.get_args(Exporter),
}


def _validation_problem(exc: msgspec.ValidationError) -> _Invalid:
    message = str(exc)
    text, _, where = message.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").removeprefix(".") or "(top level)"
    field = re.match(r"Object (contains unknown|missing required) field `([^`]*)`", text)
    if field is None:
        problem = text[:1].lower() + text[1:]
        choices = _CHOICES.get(re.sub(r"\[\d+\]$", "", path.rpartition(".")[2]))
        if problem.startswith("invalid enum value") and choices:
            problem += f"; one of {', '.join(choices)}"
        return _Invalid(path, problem)
    key = field.group(2) if path == "(top level)" else f"{path}.{field.group(2)}"
    return _Invalid(
        key, "unknown key" if field.group(1) == "contains unknown" else "missing required key"
    )


def parse_config(
    text: str, *, source: str, at: datetime, resolve_price: PriceResolver | None = None
) -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in errors.

    ``at`` is the load time used to resolve each provider's price; ``resolve_price`` defaults to
    ``vapora.pricing.resolve_price``.
    """
    resolve = resolve_price if resolve_price is not None else pricing.resolve_price
    try:
        doc = msgspec.convert(tomllib.loads(text), _ConfigFile)
        return _resolve(doc, source, at, resolve)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    except msgspec.ValidationError as exc:
        problem = _validation_problem(exc)
        raise ConfigError(f"{source}: {problem}") from exc
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(
    path: str | Path, *, at: datetime, resolve_price: PriceResolver | None = None
) -> Config:
    """Read and validate the config file at ``path`` (see :func:`parse_config`)."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:  # /dev/zero was read until memory ran out
            raise ConfigError(
                f"{path}: the config file is larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB: "
                "not a config file"
            )
        # Newlines as reading it as text took them (a file of bare CRs loaded before).
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read the config file: {reason}") from exc
    return parse_config(text, source=str(path), at=at, resolve_price=resolve_price)


#: The largest config file read (a config of a hundred providers is ~20 KB).
MAX_CONFIG_BYTES = 1024 * 1024


def default_config(*, at: datetime, resolve_price: PriceResolver | None = None) -> Config:
    """The embedded default (``vapora/default.toml``), used when no file is given."""
    text = importlib.resources.files("vapora").joinpath("default.toml").read_text(encoding="utf-8")
    return parse_config(text, source="<embedded default>", at=at, resolve_price=resolve_price)


def config_path(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The config file to load: the flag, else ``VAPORA_CONFIG``, else None (the default)."""
    return flag or env.get(ENV_CONFIG) or None


def apply_env(config: Config, env: Mapping[str, str], *, nats_url: str | None = None) -> Config:
    """Override the NATS URLs: ``nats_url`` (a flag) first, else ``VAPORA_NATS_URL``.

    Either may be a comma-separated list for a cluster. ``VAPORA_NATS_USER`` and
    ``VAPORA_NATS_PASSWORD`` replace the NATS user and password, so a deployment keeps its
    passwords in the environment, never in a file.
    """
    config = _env_credentials(config, env)
    override = nats_url or env.get(ENV_NATS_URL)
    if not override:
        return config
    key = "--nats-url" if nats_url else ENV_NATS_URL
    urls = [u.strip() for u in override.split(",") if u.strip()]
    try:
        checked = _nats_urls(key, urls)
    except _Invalid as exc:
        raise ConfigError(str(exc)) from exc
    return msgspec.structs.replace(config, nats=msgspec.structs.replace(config.nats, urls=checked))


def _env_credentials(config: Config, env: Mapping[str, str]) -> Config:
    user = env.get(ENV_NATS_USER) or config.nats.user
    password = env.get(ENV_NATS_PASSWORD) or config.nats.password
    if (user, password) == (config.nats.user, config.nats.password):
        return config
    if user is None:
        raise ConfigError(f"{ENV_NATS_PASSWORD}: needs a user ({ENV_NATS_USER} or nats.user)")
    if config.nats.token is not None:
        raise ConfigError(f"{ENV_NATS_USER}: give a token or a user and password, not both")
    nats = msgspec.structs.replace(config.nats, user=user, password=password)
    return msgspec.structs.replace(config, nats=nats)


def load(
    flag: str | None,
    *,
    env: Mapping[str, str],
    at: datetime,
    nats_url: str | None = None,
    resolve_price: PriceResolver | None = None,
) -> Config:
    """The config a command runs with: the file (flag, ``VAPORA_CONFIG`` or default), then env."""
    path = config_path(flag, env)
    if path is None:
        config = default_config(at=at, resolve_price=resolve_price)
    else:
        config = load_config(path, at=at, resolve_price=resolve_price)
    return apply_env(config, env, nats_url=nats_url)


# --- rendering ----------------------------------------------------------------------------------


def _mapping_rows(config: Config) -> list[tuple[str, tuple[str, ...] | None, str]]:
    rows = []
    for task_type in TaskType:
        origin = "rule" if config.rule(task_type) is not None else "guide default"
        mapping = config.mapping(task_type)
        rows.append((task_type.value, mapping, origin if mapping is not None else "none"))
    return rows


def render_json(config: Config) -> str:
    """The resolved config as JSON (secrets masked), plus each task type's effective mapping."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    nats = data["nats"]
    for secret in ("password", "token"):
        if nats[secret] is not None:
            nats[secret] = _MASK
    nats["urls"] = [redact_url(url) for url in nats["urls"]]
    if config.telemetry.otlp_endpoint is not None:
        data["telemetry"]["otlp_endpoint"] = redact_url(config.telemetry.otlp_endpoint)
    for provider in data["providers"]:
        provider["base_url"] = redact_url(provider["base_url"])
    data["mappings"] = {name: list(m) if m else None for name, m, _ in _mapping_rows(config)}
    return json.dumps(data, indent=2)


def _money(value: Decimal | None) -> str:
    return "none" if value is None else f"${value:.2f}"


def _provider_lines(p: ProviderConfig, env: Mapping[str, str] | None) -> list[str]:
    if p.api_key_env is None:
        key = "no API key"
    elif env is None:
        key = f"key from ${p.api_key_env}"
    else:
        reason = missing_api_key(p, env)
        state = "set" if reason is None else "missing" if reason.endswith("not set") else "unusable"
        key = f"key from ${p.api_key_env} ({state})"
    price = p.price
    lines = [
        f"  {p.name}: {p.kind.value} {p.model} at {redact_url(p.base_url)}",
        f"    {key}; quality {p.quality:g}; priority {p.priority}; timeout {p.timeout_ms} ms;"
        + (f" rate limit {p.rate_limit_rpm} rpm" if p.rate_limit_rpm else " no rate limit"),
        f"    breaker: opens after {p.breaker_threshold} failures in a row, half-opens after"
        f" {p.breaker_cooldown_ms} ms",
        f"    price per Mtok: input ${price.input_per_mtok} output ${price.output_per_mtok}"
        f" ({price.source} {price.version})",
    ]
    if p.kind is ProviderKind.OPENAI:
        lines.append(_tier_line(p))
    left_out = pricing.tiers_left_out(p.kind.value, p.model, price, datetime.now(UTC))
    if left_out is not None:
        lines.append(f"    note: {left_out}")
    return lines


def _tier_line(p: ProviderConfig) -> str:
    """What an OpenAI provider's calls ask for as service tier, and what bounds their holds."""
    tier = p.service_tier
    sent = (
        f"service tier {tier} sent with every call"
        if tier is not None
        else "no service tier sent (the project's default serves)"
    )
    kind, now = p.kind.value, datetime.now(UTC)
    if p.price.source != "genai-prices":
        # A configured price is the call's whatever the tier: said where it likely differs.
        other = tier is not None and tier not in pricing.STANDARD_TIERS
        return f"    {sent}" + ("; the configured price is used at that tier" if other else "")
    standard = p.price
    dearer_tiers = sorted(
        t
        for t in pricing.unsaid_tiers(kind, p.model, tier)
        if (q := pricing.tier_price(kind, p.model, standard, t, now)) is not None
        and (
            q.input_per_mtok > standard.input_per_mtok
            or q.output_per_mtok > standard.output_per_mtok
        )
    )
    if not dearer_tiers:
        return f"    {sent}"
    dearer = ", ".join(dearer_tiers)
    return f"    {sent}; holds bounded at the dearest of its standard, {dearer} rates"


def _routing_lines(config: Config) -> list[str]:
    lines = ["routing (task type -> chain):"]
    for name, mapping, origin in _mapping_rows(config):
        chain = " -> ".join(mapping) if mapping else "(no mapping: unknown_task_type)"
        lines.append(f"  {name:<19} {chain}  [{origin}]")
    r = config.routing
    w, q = r.weights, r.required_quality
    lines.append(f"  score weights: quality {w.quality:g}, cost {w.cost:g}, latency {w.latency:g}")
    lines.append(
        f"  required quality: low {q.low:g}, medium {q.medium:g}, high {q.high:g}, "
        f"critical {q.critical:g}; shortfall penalty {r.shortfall_penalty:g}"
    )
    lines.append(f"  zero-cost last resort: {'yes' if r.zero_cost_last_resort else 'no'}")
    overflow = "the next model" if r.context_overflow_fallback else "502 at once"
    lines.append(f"  an input too long for a model's context window: {overflow}")
    return lines


def _tail_lines(config: Config) -> list[str]:
    b, n, t = config.budget, config.nats, config.telemetry
    nats = ", ".join(redact_url(u) for u in n.urls) if n.urls else "embedded server"
    in_url = any("@" in u.partition("://")[2].partition("/")[0] for u in n.urls)
    auth = (
        "token"
        if n.token
        else (
            "user " + n.user
            if n.user
            else ("creds file" if n.creds else "in the URL" if in_url else "none")
        )
    )
    replies = n.inbox_prefix or inbox_prefix(
        n.user, n.urls, token_or_creds=bool(n.token or n.creds)
    )
    return [
        f"budget: daily {_money(b.daily_limit_usd)}, monthly {_money(b.monthly_limit_usd)}, "
        f"per task {_money(b.per_task_limit_usd)} (an idle task kept "
        f"{b.task_retention_hours:g} h), warn at {b.warn_threshold_percent:g}%; "
        + (f"router leases up to {_money(b.lease_usd)}" if b.lease_usd else "no router leases"),
        f"nats: {nats}; auth {auth}; tls {_tls_said(n)}; replies under {replies}",
        f"storage: {config.storage.data_dir} (embedded server sync_interval: "
        f"{config.storage.sync_interval}); event stream replicas "
        + (str(config.storage.replicas) if config.storage.replicas else "3 on a cluster, else 1"),
        f"telemetry: {'on' if t.enabled else 'off'}, exporter {t.exporter}, "
        f"traces {'on' if t.traces else 'off'} (sampled {t.sample_ratio:g}), "
        f"metrics {'on' if t.metrics else 'off'}, "
        f"prometheus port {t.prometheus_port or 'none'}, capture content {t.capture_content}, "
        f"service name {t.service_name or 'vapora (vapora-<kind> for `vapora actor <kind>`)'}"
        + (", OTLP spans exported by a child process" if t.export_process else ""),
    ]


def render_text(config: Config, env: Mapping[str, str] | None = None) -> str:
    """The resolved config as readable text; with ``env``, says whether each API key is set."""
    lines = [f"config: {config.source}", "providers:"]
    for provider in config.providers:
        lines.extend(_provider_lines(provider, env))
    lines.extend(_routing_lines(config))
    lines.extend(_tail_lines(config))
    return "\n".join(lines) + "\n"


def config_command(
    path: str | None, *, as_json: bool, env: Mapping[str, str], at: datetime | None = None
) -> tuple[int, str]:
    """``vapora config F``: (0, the rendered config) or (2, the reason the file is bad).

    ``path`` None means ``VAPORA_CONFIG`` or the embedded default; ``VAPORA_NATS_URL`` applies.
    """
    when = at if at is not None else datetime.now(UTC)
    try:
        config = load(path, env=env, at=when)
    except ConfigError as exc:
        return 2, f"vapora config: {exc.message}\n"
    return 0, (render_json(config) + "\n") if as_json else render_text(config, env)
