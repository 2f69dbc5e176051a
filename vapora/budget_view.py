"""What the budget fold reads of the log: a decoder of only those fields, for bulk replays.

A replay into budget state (the keeper's restart, ``bench/bench_budget.py``) decodes every event
of its tail. The contract's event types carry far more than the fold reads: a ``spend_recorded``
has its usage and its ``Price`` (four decimals); the fold needs its id, time, task, reservation
and cost. These views are tagged Structs of the same tags with only the fields the fold and the
keeper read, of the same types (so the same values: the same ``Decimal``, the same UTC
``datetime``); msgspec skips the rest of each object without building it, which halves the
decoding of a replayed batch. Event types the fold does not read decode to empty views.

The fold treats a view exactly as the event it stands for (``vapora.budget`` registers both
types).

Views are read-only copies of part of an event: validation of the rest of the event (its usage,
its price) is the business of the decoders that read it (the ledger, the audit). Their amounts
are not checked here (a check per view was a fifth of their decoding): the fold passes by an
event whose amount no sum can take, as the full event's decoder makes it unreadable.

So a replay counts an event whose money is readable even when the rest of it is not (a task
type a newer writer added, a token count out of range, no price). The keeper's live tail, which
decodes whole events, reads such an event again with :func:`decode_view` (and says so), so a
live keeper and a restarted one count the same money.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Union, get_args

import msgspec

from events.codec import DecodeError, decode_with
from events.contract import Tier
from events.log import Event, Money, check_times

__all__ = [
    "BudgetLeasedView",
    "BudgetReleasedView",
    "BudgetReservedView",
    "BudgetTierChangedView",
    "LeaseReturnedView",
    "SpendRecordedView",
    "FOLDED",
    "View",
    "decode_view",
    "decode_views",
]

_Version = Annotated[int, msgspec.Meta(ge=1)]


class View(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Part of one event, as the budget fold reads it."""

    def __post_init__(self) -> None:
        check_times(self)  # (as the whole event's: unreadable alike; a view is read at a start)


class BudgetReservedView(View, tag="budget_reserved", frozen=True, kw_only=True):
    id: str
    at: datetime
    task_id: str
    reservation_id: str
    provider: str
    amount_usd: Money
    expires_at: datetime
    task_limit_usd: Money | None = None


class SpendRecordedView(View, tag="spend_recorded", frozen=True, kw_only=True):
    id: str
    at: datetime
    task_id: str
    cost_usd: Money
    reservation_id: str | None = None


class BudgetReleasedView(View, tag="budget_released", frozen=True, kw_only=True):
    id: str
    at: datetime
    task_id: str
    reservation_id: str


class BudgetLeasedView(View, tag="budget_leased", frozen=True, kw_only=True):
    id: str
    at: datetime
    lease_id: str
    holder: str
    granted_usd: Money
    expires_at: datetime
    version: _Version = 1


class LeaseReturnedView(View, tag="budget_lease_returned", frozen=True, kw_only=True):
    id: str
    at: datetime
    lease_id: str
    kept_usd: Money
    reason: Literal["returned", "expired", "revoked"]
    version: _Version = 1


class BudgetTierChangedView(View, tag="budget_tier_changed", frozen=True, kw_only=True):
    id: str
    at: datetime
    to_tier: Tier


_READ = (
    BudgetReservedView,
    SpendRecordedView,
    BudgetReleasedView,
    BudgetLeasedView,
    LeaseReturnedView,
    BudgetTierChangedView,
)
#: The views the budget fold and the keeper read (every other event type's view is empty).
FOLDED: tuple[type[View], ...] = _READ


def _tag(struct: type[msgspec.Struct]) -> str:
    tag = struct.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# Every other event type of the contract: an empty view of its tag (its fields are skipped).
_READ_TAGS = {_tag(view) for view in _READ}
_SKIPPED = tuple(
    msgspec.defstruct(
        f"{event.__name__}View", [], bases=(View,), tag=_tag(event), frozen=True, kw_only=True
    )
    for event in get_args(Event)
    if _tag(event) not in _READ_TAGS
)
_decoder: msgspec.json.Decoder[list[View]] = msgspec.json.Decoder(
    list[Union[_READ + _SKIPPED]]  # type: ignore[misc]  # noqa: UP007 - built at run time
)


def decode_views(data: bytes) -> list[View]:
    """Decode a JSON array of events into their views (the event log's batch decoding)."""
    return decode_with(_decoder, data)


def decode_view(data: bytes) -> View:
    """Decode one stored event (a JSON object) into its view, as :func:`decode_views` decodes
    it in a batch; raises :class:`events.codec.DecodeError` if it is not one event."""
    decoded = decode_views(b"[" + data + b"]")
    if len(decoded) != 1:
        raise DecodeError(f"expected one event, found {len(decoded)}")
    return decoded[0]
