"""The event log's event types: one tagged union, tag field ``type`` (DESIGN §3, "The event log").

Every event has an ``id`` (sent as ``Nats-Msg-Id`` so a retried append is stored once), ``at`` (UTC)
and, where it belongs to one, the ``task_id``; ``causation_id`` names the event it answers.
Evolution rules: new fields get defaults, nothing is renamed or retyped, a breaking change is a
new tag. Unknown fields are tolerated on decode so that an older reader can replay a newer log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from events.contract import (
    AttemptNumber,
    Price,
    Quality,
    RouteDecision,
    TaskType,
    Tier,
    Tokens,
    Usage,
    check_amount,
)

__all__ = [
    "HEALTH_HEARTBEAT_S",
    "INSTANCE_FORGOTTEN_S",
    "INSTANCE_STOPPED",
    "BudgetLeaseReturned",
    "BudgetLeased",
    "BudgetReleased",
    "BudgetReserved",
    "BudgetTierChanged",
    "CallFailed",
    "CallSucceeded",
    "Event",
    "EVENT_TYPES",
    "FallbackTriggered",
    "ProviderHealthChanged",
    "RouteDecided",
    "SpendRecorded",
]

Money = Annotated[Decimal, msgspec.Meta(description="USD as a decimal string, never a float")]


# gc=False: events are frozen trees of strings, numbers, timestamps and other frozen structs (no
# reference cycles possible), so the cycle collector need not track them. A replay decodes them
# by the million; tracked, they made the collector run over and over (~12 % of a budget replay).
def check_times(event: msgspec.Struct) -> None:
    """Raise ``ValueError`` naming the field unless ``event``'s ``at`` (and ``expires_at``, if
    it has one) is a time in the years 1 to 9999 once in UTC. ``9999-12-31T23:30:00-01:00`` is
    valid ISO 8601 and decodes, and every reader that put it in UTC (the budget fold's day,
    the audit, a comparison with now) then failed with an ``OverflowError``: the keeper's tail
    retried it forever, counting no spend after it, and no keeper could start again."""
    for name in ("at", "expires_at"):
        value = getattr(event, name, None)
        # (only the first and the last year can leave the range: every other time is read as
        # it is, without the conversion, on each event every reader decodes)
        if value is None or 1 < value.year < 9999:
            continue
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError(
                f"`{name}` {value.isoformat()} is outside the years 1 to 9999 once in UTC"
            ) from None


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    id: str
    at: datetime
    causation_id: str | None = None

    def __post_init__(self) -> None:
        # (inline: every reader decodes every event; a hold's `expires_at` is checked by its
        # event's own __post_init__)
        if not 1 < self.at.year < 9999:
            check_times(self)


class RouteDecided(_Event, tag="route_decided", frozen=True, kw_only=True):
    """The router chose a chain of providers for a task; ``decision`` says why."""

    task_id: str
    task_type: TaskType
    quality: Quality
    decision: RouteDecision
    stream: bool = False


class CallSucceeded(_Event, tag="call_succeeded", frozen=True, kw_only=True):
    task_id: str
    provider: str
    model: str
    attempt: AttemptNumber
    usage: Usage
    cost_usd: Money
    latency_ms: float
    first_token_ms: float | None = None
    finish_reason: str | None = None
    stream: bool = False
    # True when vapora estimated the counts (the provider stated none, or none it could bill
    # by): an extension, left out of the JSON otherwise.
    usage_estimated: bool | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount("cost_usd", self.cost_usd)


class CallFailed(_Event, tag="call_failed", frozen=True, kw_only=True):
    """An attempt failed. ``usage`` and ``cost_usd`` are what the provider billed anyway."""

    task_id: str
    provider: str
    model: str
    attempt: AttemptNumber
    error_code: str
    error_class: str
    message: str
    status: int | None = None
    latency_ms: float = 0.0
    usage: Usage = Usage()
    cost_usd: Money = Decimal(0)
    after_first_chunk: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount("cost_usd", self.cost_usd)


class FallbackTriggered(_Event, tag="fallback_triggered", frozen=True, kw_only=True):
    task_id: str
    from_provider: str
    to_provider: str | None
    reason: str
    attempt: AttemptNumber


class BudgetReserved(_Event, tag="budget_reserved", frozen=True, kw_only=True):
    task_id: str
    reservation_id: str
    provider: str
    amount_usd: Money
    expires_at: datetime
    task_limit_usd: Money | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 < self.expires_at.year < 9999:
            check_times(self)
        check_amount("amount_usd", self.amount_usd)
        check_amount("task_limit_usd", self.task_limit_usd)


class SpendRecorded(_Event, tag="spend_recorded", frozen=True, kw_only=True):
    """Money spent: settles ``reservation_id`` at the actual cost. Carries the prices used."""

    task_id: str
    task_type: TaskType
    provider: str
    model: str
    input_tokens: Tokens
    output_tokens: Tokens
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    # Of cache_write_tokens, those written for an hour (an extension, as in Usage: unset, and
    # left out of the JSON, when there are none).
    cache_write_1h_tokens: Tokens | msgspec.UnsetType = msgspec.UNSET
    cost_usd: Money
    price: Price
    reservation_id: str | None = None
    attempt: AttemptNumber = 1
    # As in CallSucceeded: the counts were estimated by vapora (an extension; left out when not).
    usage_estimated: bool | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount("cost_usd", self.cost_usd)


class BudgetReleased(_Event, tag="budget_released", frozen=True, kw_only=True):
    task_id: str
    reservation_id: str
    reason: Literal["settled", "failed", "expired", "not_called", "cancelled"]


class BudgetLeased(_Event, tag="budget_leased", frozen=True, kw_only=True):
    """Budget granted to a router (``holder``) to admit paid attempts locally, or a lease extended.

    ``granted_usd`` is the lease's cumulative total (an extension repeats the lease id with a
    larger total and a later expiry); ``version`` orders the events of one lease, so folding one
    twice changes nothing. Spend whose ``reservation_id`` is the lease id draws it down.
    """

    lease_id: str
    holder: str
    granted_usd: Money
    expires_at: datetime
    version: Annotated[int, msgspec.Meta(ge=1)] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 < self.expires_at.year < 9999:
            check_times(self)
        check_amount("granted_usd", self.granted_usd)


class BudgetLeaseReturned(_Event, tag="budget_lease_returned", frozen=True, kw_only=True):
    """A lease given back: its holder keeps ``kept_usd`` (spent or still in flight under it), the
    rest is free again. ``expired`` closes the lease outright (its holder stopped renewing it)."""

    lease_id: str
    holder: str
    kept_usd: Money
    reason: Literal["returned", "expired", "revoked"]
    version: Annotated[int, msgspec.Meta(ge=1)] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_amount("kept_usd", self.kept_usd)


class BudgetTierChanged(_Event, tag="budget_tier_changed", frozen=True, kw_only=True):
    """The tier moved; ``causation_id`` is the event that moved it."""

    from_tier: Tier
    to_tier: Tier
    daily_percent: float
    monthly_percent: float


#: How often a provider actor instance repeats its health when nothing changed (seconds), and
#: after how long without a word from it a router forgets it.
HEALTH_HEARTBEAT_S = 600.0
INSTANCE_FORGOTTEN_S = 1500.0
#: The ``reason`` of the ``provider_health_changed`` an instance appends when it stops: it says
#: nothing of the provider (``available`` stays true); routers forget the instance.
INSTANCE_STOPPED = "instance stopped"


class ProviderHealthChanged(_Event, tag="provider_health_changed", frozen=True, kw_only=True):
    """A provider actor's view of its provider changed. ``instance`` (an extension; None in
    events written before it): which actor process says so, since several may serve one
    provider, each with its own environment (its API key) and its own breaker. Each instance
    also says it again every :data:`HEALTH_HEARTBEAT_S` (so a router that starts finds every
    live instance in the last :data:`INSTANCE_FORGOTTEN_S` of the log) and, as it stops, with
    the reason :data:`INSTANCE_STOPPED`."""

    provider: str
    available: bool
    reason: str
    breaker: Literal["closed", "open", "half_open"] = "closed"
    rate_limited_until: datetime | None = None
    latency_estimate_ms: float | None = None
    instance: str | None = None


Event = (
    RouteDecided
    | CallSucceeded
    | CallFailed
    | FallbackTriggered
    | BudgetReserved
    | SpendRecorded
    | BudgetReleased
    | BudgetTierChanged
    | ProviderHealthChanged
    | BudgetLeased
    | BudgetLeaseReturned
)

EVENT_TYPES: dict[str, type[_Event]] = {
    "route_decided": RouteDecided,
    "call_succeeded": CallSucceeded,
    "call_failed": CallFailed,
    "fallback_triggered": FallbackTriggered,
    "budget_reserved": BudgetReserved,
    "spend_recorded": SpendRecorded,
    "budget_released": BudgetReleased,
    "budget_tier_changed": BudgetTierChanged,
    "provider_health_changed": ProviderHealthChanged,
    "budget_leased": BudgetLeased,
    "budget_lease_returned": BudgetLeaseReturned,
}
