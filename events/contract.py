"""Requests, replies and stream messages of vapora's public and internal NATS contract (DESIGN §3).

Every message is a frozen, keyword-only msgspec Struct; requests forbid unknown fields so that a
typo in a caller's payload is a 400, not a silently ignored option. Money is ``Decimal`` (a JSON
string on the wire). Token counts follow the OpenTelemetry GenAI convention: ``input_tokens``
counts *all* input tokens, cached ones included; ``cache_read_tokens`` and ``cache_write_tokens``
are subsets of it.
"""

from __future__ import annotations

import decimal
import enum
import itertools
import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

__all__ = [
    "MAX_AMOUNT",
    "MAX_ATTEMPTS",
    "MAX_TOKENS",
    "AttemptNumber",
    "check_amount",
    "check_task_id",
    "Attempt",
    "BudgetCaps",
    "BudgetCapsRequest",
    "BudgetLeaseReply",
    "BudgetLeaseRequest",
    "BudgetLeaseReturn",
    "BudgetRelease",
    "BudgetReserve",
    "BudgetReserveReply",
    "BudgetStatus",
    "BudgetStatusRequest",
    "Candidate",
    "ChatMessage",
    "CompletionRequest",
    "CompletionResult",
    "CostReport",
    "ErrorBody",
    "ErrorReply",
    "FilterVerdict",
    "Outcome",
    "Price",
    "PriceTier",
    "ProviderCall",
    "ProviderCallResult",
    "Quality",
    "ReportRequest",
    "RouteDecision",
    "StreamChunk",
    "StreamEnd",
    "StreamError",
    "StreamMessage",
    "TaskType",
    "TaskCap",
    "Tier",
    "Usage",
]


class TaskType(enum.StrEnum):
    """The guide's seven task types; each maps to a primary provider and a fallback chain."""

    CODE_GENERATION = "CodeGeneration"
    CODE_REVIEW = "CodeReview"
    ARCHITECTURE_DESIGN = "ArchitectureDesign"
    DOCUMENTATION = "Documentation"
    GENERAL_QUERY = "GeneralQuery"
    EMBEDDINGS = "Embeddings"
    SECURITY_ANALYSIS = "SecurityAnalysis"


class Quality(enum.StrEnum):
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"
    CRITICAL = "Critical"


class Tier(enum.StrEnum):
    """Budget enforcement tier (DESIGN §4)."""

    NORMAL = "Normal"
    NEAR_THRESHOLD = "NearThreshold"
    EXCEEDED = "Exceeded"


class Outcome(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"


#: The largest token count a message or event may carry: what SQLite's integers hold (2**64
#: overflowed them, stopping the ledger). What vapora writes is far below it (a provider's count
#: past 2**53 is not taken: vapora.providers.values); an older version's stored events were not
#: bounded so, and stay readable up to it.
MAX_TOKENS = 2**63 - 1
#: The most attempts a task's record may number (a chain tries each provider at most once).
MAX_ATTEMPTS = 10_000
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
#: An attempt's number in an event: bounded as a stored integer must be (0 is an old default).
AttemptNumber = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPTS)]
Money = Annotated[Decimal, msgspec.Meta(description="USD as a decimal string, never a float")]
Milliseconds = Annotated[float, msgspec.Meta(ge=0)]


#: The largest amount a request may name, in its unit (USD, or cents for ``budget_cents``):
#: far past any budget, and small enough that sums of such amounts stay exact in the budget
#: fold's decimal context (``1E+1000000`` overflowed it after being stored as an event).
MAX_AMOUNT = Decimal(10) ** 15
#: A requested amount's most significant digits and decimal places (the pricing computes at 50
#: digits; events' amounts, computed, are not bounded so).
MAX_DIGITS = 50
#: The context sums of amounts are made in (the budget fold, the audit, the ledger's report):
#: wide enough that adding up to 10^50 amounts of :data:`MAX_DIGITS` digits never rounds (the
#: default 28 digits did).
EXACT_SUMS = decimal.Context(prec=120, rounding=decimal.ROUND_HALF_EVEN)


def cents_to_usd(cents: Decimal | int) -> Decimal:
    """``cents`` in USD, exactly: a limit or cap of up to :data:`MAX_DIGITS` digits kept whole
    (divided by 100 in the default 28-digit context, ``99.99…9`` cents of 32 digits became a
    limit of $1.000…0, slightly past what was set)."""
    return EXACT_SUMS.divide(Decimal(cents), 100)


#: The longest task or reservation id (the budget keeper's limit).
MAX_ID_LENGTH = 200


def check_amount(name: str, value: Decimal | None, *, request: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` (if given) is a finite,
    non-negative decimal of at most :data:`MAX_AMOUNT`. Requests and events (on decoding, so
    one stored with such an amount is unreadable rather than poison to every sum) call it:
    msgspec cannot constrain ``Decimal`` fields, and NaN or Infinity would poison every sum."""
    if value is not None and not (value.is_finite() and 0 <= value <= MAX_AMOUNT):
        shown = str(value) if len(str(value)) <= 40 else str(value)[:40] + "..."
        raise ValueError(
            f"`{name}` must be a finite, non-negative decimal of at most {MAX_AMOUNT:,f}, "
            f"got {shown}"
        )
    if value is not None and request:
        # What a caller names, at most the pricing's precision: the budget fold sums such
        # amounts exactly. (Not an event's: a cost or a sum of costs is stored as it is, any
        # precision, never refused, so no spend is lost.)
        digits = value.as_tuple()
        if len(digits.digits) > MAX_DIGITS or int(digits.exponent) < -MAX_DIGITS:
            raise ValueError(
                f"`{name}` must have at most {MAX_DIGITS} significant digits and "
                f"{MAX_DIGITS} decimal places"
            )


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every request vapora receives: immutable, keyword-only, an unknown field rejected
    (a 400 naming it: a misspelt field is the caller's mistake, never silently dropped)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_task_id(task_id: str) -> None:
    """A task id a request may name: 1 to :data:`MAX_ID_LENGTH` characters (the budget keeper
    refuses longer ids: taken, the task would fail as over budget), none of them a control
    character (a newline in one wrote lines of its own into every log line of the task)."""
    if not 1 <= len(task_id) <= MAX_ID_LENGTH:
        raise ValueError(f"`task_id` must be 1 to {MAX_ID_LENGTH} characters")
    found = _CONTROL.search(task_id)
    if found is not None:
        raise ValueError(
            f"`task_id` must not hold a control character (found U+{ord(found.group()):04X} "
            f"at {found.start()})"
        )


class _Reply(msgspec.Struct, frozen=True, kw_only=True):
    """Base of what vapora writes for others to read (replies, stream messages and the parts of
    events): immutable, keyword-only, an unknown field skipped. A newer writer may add fields
    (DESIGN §3: new fields get defaults), and an older reader, a caller's client or an actor
    replaying the log, still reads the rest: rejected, a newer log's spend would be unreadable
    to an older ledger or keeper."""


class ChatMessage(_Message, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionRequest(_Message, frozen=True, kw_only=True):
    """A task for vapora: published by other services on ``vapora.complete`` / ``vapora.stream``."""

    task_id: str | None = None
    task_type: TaskType = TaskType.GENERAL_QUERY
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    quality: Quality = Quality.MEDIUM
    domain: str | None = None
    complexity: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    latency_required_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    budget_cents: Decimal | None = None
    provider: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` is required")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must not be empty")
        # Nothing to answer: routed, it was billed for an empty answer (or a provider's 400).
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` must hold some text, not only whitespace")
        if self.messages is not None and not any(m.content.strip() for m in self.messages):
            raise ValueError("`messages` must hold some text: every `content` is empty")
        if self.task_id is not None:
            check_task_id(self.task_id)
        check_amount("budget_cents", self.budget_cents, request=True)


class Usage(_Reply, frozen=True, kw_only=True):
    """Provider-reported token counts. ``input_tokens`` includes both cache counts.

    ``cache_write_1h_tokens`` (an extension): of ``cache_write_tokens``, those written to the
    cache for an hour (Anthropic's ``ephemeral_1h_input_tokens``), billed at their own rate;
    left out of the JSON when there are none (unset, read as 0), so usage without them encodes
    as it always did."""

    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    cache_write_1h_tokens: Tokens | msgspec.UnsetType = msgspec.UNSET


class PriceTier(_Reply, frozen=True, kw_only=True, omit_defaults=True):
    """Long-context rates, per million tokens: they apply to *every* token of a call whose input
    (cache reads and writes included) exceeds ``above_input_tokens`` (a cliff, not a marginal
    rate, as the providers bill it)."""

    above_input_tokens: Tokens
    input_per_mtok: Money
    output_per_mtok: Money
    cache_read_per_mtok: Money
    cache_write_per_mtok: Money
    cache_write_1h_per_mtok: Money | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write", "cache_write_1h"):
            check_amount(f"{name}_per_mtok", getattr(self, f"{name}_per_mtok"))


class Price(_Reply, frozen=True, kw_only=True, omit_defaults=True):
    """The prices a cost was computed from, per million tokens, and where they came from.

    ``tiers`` (an extension, in ascending ``above_input_tokens``): long-context rates that
    replace these for a call with more input; empty for a flat price, and then left out of the
    JSON, so a price without tiers encodes as it always did. ``cache_write_1h_per_mtok`` (an
    extension): the rate of an hour-long cache write (Anthropic's), where it differs from
    ``cache_write_per_mtok``; None (left out) means the same rate."""

    input_per_mtok: Money
    output_per_mtok: Money
    cache_read_per_mtok: Money
    cache_write_per_mtok: Money
    source: str
    version: str
    tiers: tuple[PriceTier, ...] = ()
    cache_write_1h_per_mtok: Money | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write", "cache_write_1h"):
            check_amount(f"{name}_per_mtok", getattr(self, f"{name}_per_mtok"))
        thresholds = [tier.above_input_tokens for tier in self.tiers]
        if any(low >= high for low, high in itertools.pairwise(thresholds)):
            raise ValueError("`tiers` must be in strictly ascending `above_input_tokens`")


class Attempt(_Reply, frozen=True, kw_only=True):
    provider: str
    model: str
    outcome: Outcome
    error_code: str | None = None
    latency_ms: Milliseconds = 0.0
    cost_usd: Money = Decimal(0)


class FilterVerdict(_Reply, frozen=True, kw_only=True):
    """One routing filter's verdict on one candidate: kept or dropped, and why."""

    filter: str
    passed: bool
    reason: str = ""


class Candidate(_Reply, frozen=True, kw_only=True):
    provider: str
    model: str
    verdicts: list[FilterVerdict] = []
    score: float | None = None
    estimated_cost_usd: Money | None = None
    kept: bool = False


class RouteDecision(_Reply, frozen=True, kw_only=True):
    """Why the router chose what it chose: every candidate with each filter's verdict and score."""

    reason: str
    chain: list[str] = []
    candidates: list[Candidate] = []
    tier: Tier = Tier.NORMAL


class CompletionResult(_Reply, frozen=True, kw_only=True):
    task_id: str
    provider: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cost_usd: Money
    latency_ms: Milliseconds
    attempts: list[Attempt]
    route: RouteDecision
    #: An extension (the 2026-11-27 night version): ``true`` when the answering attempt's counts
    #: are vapora's estimate from above (the provider stated none, or one past what the request
    #: could be billed for), as its ``spend_recorded`` says; absent otherwise.
    usage_estimated: bool | msgspec.UnsetType = msgspec.UNSET


class StreamChunk(_Reply, tag="chunk", tag_field="type", frozen=True, kw_only=True):
    task_id: str
    seq: Annotated[int, msgspec.Meta(ge=0)]
    text: str


class StreamEnd(_Reply, tag="end", tag_field="type", frozen=True, kw_only=True):
    """The last message of a successful stream: every CompletionResult field but ``text``.

    ``chunks`` (an extension): how many ``chunk`` messages the stream sent, ``seq`` 0 to
    ``chunks - 1``. The chunks come from the provider actor and the end from the router, so on a
    cluster the end can arrive before the last chunks: a reader waits for them. None from a
    router that does not say."""

    task_id: str
    provider: str
    model: str
    finish_reason: str | None
    usage: Usage
    cost_usd: Money
    latency_ms: Milliseconds
    attempts: list[Attempt]
    route: RouteDecision
    chunks: int | None = None
    usage_estimated: bool | msgspec.UnsetType = msgspec.UNSET  # (as CompletionResult's)


class ErrorBody(_Reply, frozen=True, kw_only=True):
    code: str
    message: str


class StreamError(_Reply, tag="error", tag_field="type", frozen=True, kw_only=True):
    error: ErrorBody
    task_id: str | None = None
    usage: Usage | None = None
    cost_usd: Money | None = None


StreamMessage = StreamChunk | StreamEnd | StreamError


class ErrorReply(_Reply, frozen=True, kw_only=True, omit_defaults=True):
    """The body of every error reply (with ``Nats-Service-Error(-Code)`` headers).

    An extension (2026-11-27): a ``vapora.complete`` error once its task is made (the request
    was read) names the task (``task_id``: a caller that let vapora make the id up can find the
    task's events); a 502 ``provider_error`` whose one attempt's cost is known says what it cost
    (``usage``, ``cost_usd``: the provider answered, and billed, but the answer cannot be
    delivered, or it refused the request), as a stream's ``error`` message does. Each is left
    out when not known, so an error before any task is the plain body it always was."""

    error: ErrorBody
    task_id: str | None = None
    usage: Usage | None = None
    cost_usd: Money | None = None


class BudgetPending(_Message, frozen=True, kw_only=True):
    """On ``vapora.budget.pending`` (an extension; a provider actor or a router to the budget
    keeper, no reply): the reservations or leases (``holds``, their ids) whose calls' spend this
    provider actor holds on disk because the event log refused it, and appends again every 2 s;
    or, from a router, the reservations and leases of its attempts that got no answer, said
    every 5 s until their spend reaches it (their provider actor may record it late). The
    keeper expires none of them for a minute after each such word: the money they hold is
    spent, or may be, only not yet in the log."""

    holds: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]],
        msgspec.Meta(max_length=1000),
    ]


class AttemptsUnbilled(_Message, frozen=True, kw_only=True):
    """On ``vapora.budget.unbilled`` (an extension; a provider actor to every router, no
    reply): attempts that ended with nothing billed or were not made (``spend_ids``: the ids
    their routers sent as ``Vapora-Spend-Id``, which their spend would have taken). A router
    that stopped waiting for one of them (silent: its provider actor did not answer in time)
    stops saying its hold is pending (``vapora.budget.pending``): the keeper may expire it as
    any other, instead of an hour later."""

    spend_ids: Annotated[
        list[Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]],
        msgspec.Meta(min_length=1, max_length=1000),
    ]


class StreamCancel(_Message, frozen=True, kw_only=True):
    """On ``vapora.stream.cancel`` (an extension): the caller of the stream whose messages go to
    ``stream_to`` (the reply subject it sent ``vapora.stream`` with) stopped reading it. The
    provider actor streaming to it stops the provider's generation; what was generated until
    then is billed, and the stream does not fall back."""

    stream_to: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class ReportRequest(_Message, frozen=True, kw_only=True):
    since: datetime | None = None
    until: datetime | None = None


class CostReport(_Reply, frozen=True, kw_only=True):
    """The ledger's cost report; every figure is a sum of ``spend_recorded`` events."""

    since: datetime | None
    until: datetime | None
    total_usd: Money
    calls: int
    by_provider: dict[str, Money] = {}
    by_model: dict[str, Money] = {}
    by_task_type: dict[str, Money] = {}
    by_hour: dict[str, Money] = {}
    by_day: dict[str, Money] = {}
    days_observed: int = 0
    daily_average_usd: Money = Decimal(0)
    monthly_projection_usd: Money = Decimal(0)
    last_sequence: int = 0


class BudgetStatusRequest(_Message, frozen=True, kw_only=True):
    """``vapora.budget`` takes an empty object."""


class BudgetStatus(_Reply, frozen=True, kw_only=True):
    at: datetime
    tier: Tier
    daily_limit_usd: Money | None
    monthly_limit_usd: Money | None
    per_task_limit_usd: Money | None
    spent_today_usd: Money
    spent_month_usd: Money
    reserved_usd: Money
    open_reservations: int
    daily_percent: float
    monthly_percent: float
    warn_threshold_percent: float
    leased_usd: Money = Decimal(0)
    open_leases: int = 0


# --- internal messages (router <-> provider actors, router <-> budget keeper) -------------------


class ProviderCall(_Message, frozen=True, kw_only=True):
    """Router -> provider actor on ``vapora.provider.<name>.call``: one attempt of a task.

    For a stream, ``stream_to`` is the caller's reply subject: the provider actor publishes
    chunks there directly, so they do not pass through the router.
    """

    task_id: str
    task_type: TaskType
    attempt: Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPTS)]
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    # The bounds of a CompletionRequest's (any sender may publish here: a call of 2**70
    # tokens was a 500 and an internal error, a negative temperature went to the provider).
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    reservation_id: str | None = None
    timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    first_token_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stream_to: str | None = None

    def __post_init__(self) -> None:
        check_task_id(self.task_id)


class ProviderCallResult(_Reply, frozen=True, kw_only=True):
    """Provider actor -> router: what one attempt produced (a failure comes as an error reply).
    ``text`` is empty for a stream: its chunks went to the caller directly."""

    provider: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cost_usd: Money
    latency_ms: Milliseconds
    first_token_ms: Milliseconds | None = None
    chunks: int = 0
    usage_estimated: bool | msgspec.UnsetType = msgspec.UNSET  # (as CompletionResult's)


class BudgetReserve(_Message, frozen=True, kw_only=True):
    """Router -> budget keeper on ``vapora.budget.reserve``: hold ``amount_usd`` for one attempt."""

    reservation_id: str
    task_id: str
    provider: str
    amount_usd: Money
    task_limit_usd: Money | None = None
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 120.0

    def __post_init__(self) -> None:
        check_amount("amount_usd", self.amount_usd, request=True)
        check_amount("task_limit_usd", self.task_limit_usd, request=True)


class BudgetReserveReply(_Reply, frozen=True, kw_only=True):
    admitted: bool
    reservation_id: str
    tier: Tier
    reason: str = ""


class BudgetRelease(_Message, frozen=True, kw_only=True):
    """Router -> budget keeper: give back a reservation whose attempt did not happen or failed."""

    reservation_id: str
    reason: str


class BudgetLeaseRequest(_Message, frozen=True, kw_only=True):
    """Router -> budget keeper on ``vapora.budget.lease``: grant (a new ``lease_id``) or extend
    (an open one of this ``holder``) a lease of budget to admit paid attempts locally.

    ``min_usd`` is the least worth granting (the attempt at hand); the keeper refuses rather than
    grant less. The keeper sizes the grant; ``ttl_s`` is how long the lease lives unrenewed.
    """

    lease_id: str
    holder: str
    min_usd: Money = Decimal(0)
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0

    def __post_init__(self) -> None:
        check_amount("min_usd", self.min_usd, request=True)


class BudgetLeaseReply(_Reply, frozen=True, kw_only=True):
    """``granted_usd`` is the lease's cumulative total (spend against it included)."""

    granted: bool
    lease_id: str
    granted_usd: Money = Decimal(0)
    expires_at: datetime | None = None
    tier: Tier = Tier.NORMAL
    reason: str = ""


class BudgetCapsRequest(_Message, frozen=True, kw_only=True):
    """Router -> budget keeper on ``vapora.budget.caps`` (an extension, 2026-11-27): the task
    caps the keeper holds tasks to, a page at a time: the first page with no ``cursor``, each
    next one with the ``cursor`` the page before gave. A router reads them all before it admits
    anything on a lease: a request naming no cap, of a task whose cap the router had not seen
    (asked more than an hour before the router started), went on its lease past the cap."""

    cursor: Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH + 64)] = ""


class TaskCap(_Reply, frozen=True, kw_only=True):
    """A task's cap as the keeper enforces it (the lowest any of its requests asked for) and
    when the keeper last heard of the task (an event of it, or its hold)."""

    task_id: str
    cap_usd: Money
    last_at: datetime


class BudgetCaps(_Reply, frozen=True, kw_only=True):
    """The keeper's answer on ``vapora.budget.caps``: a page of caps (as many as fit in a
    message) and the ``cursor`` to ask the next page with; none: this was the last."""

    caps: list[TaskCap]
    cursor: str = ""


class BudgetLeaseReturn(_Message, frozen=True, kw_only=True):
    """Router -> budget keeper on ``vapora.budget.lease.return``: stop using a lease, keeping
    ``kept_usd`` (what was spent or is still in flight under it); the rest is given back."""

    lease_id: str
    holder: str
    kept_usd: Money
    reason: Literal["returned", "revoked"] = "returned"

    def __post_init__(self) -> None:
        check_amount("kept_usd", self.kept_usd, request=True)
