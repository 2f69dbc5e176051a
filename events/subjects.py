"""Every NATS subject and stream name vapora uses, in one place.

Public request subjects are what other services publish to (DESIGN §3). Internal subjects connect
the actors. Event subjects are chosen so that each writer owns its own subjects: the budget
keeper alone writes ``vapora.events.budget`` (fenced with ``Nats-Expected-Last-Subject-Sequence``),
provider actors write ``call``/``spend``/``health`` events under their provider's name, routers
write ``route`` events. Per-writer subjects also make per-actor NATS permissions possible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = [
    "BUDGET",
    "BUDGET_CAPS",
    "BUDGET_LEASE",
    "BUDGET_LEASE_RETURN",
    "BUDGET_PENDING",
    "BUDGET_UNBILLED",
    "BUDGET_RELEASE",
    "BUDGET_RESERVE",
    "COMPLETE",
    "EVENTS_PREFIX",
    "EVENTS_WILDCARD",
    "EVENT_STREAM",
    "REPORT",
    "STREAM",
    "STREAM_CANCEL",
    "INBOX",
    "TASK_SCOPE_HEADER",
    "event_subject",
    "inbox_prefix",
    "provider_call",
]

COMPLETE = "vapora.complete"
STREAM = "vapora.stream"
#: A caller that stops reading a stream says so here (``StreamCancel``, published, no reply):
#: the provider actor streaming to it stops the provider's generation (an extension).
STREAM_CANCEL = "vapora.stream.cancel"
REPORT = "vapora.report"
BUDGET = "vapora.budget"
BUDGET_RESERVE = "vapora.budget.reserve"
BUDGET_RELEASE = "vapora.budget.release"
BUDGET_LEASE = "vapora.budget.lease"
BUDGET_LEASE_RETURN = "vapora.budget.lease.return"
#: Router -> budget keeper: the task caps the keeper enforces (``BudgetCapsRequest`` ->
#: ``BudgetCaps``, a page at a time), read by a router before its first lease.
BUDGET_CAPS = "vapora.budget.caps"
#: Provider actors -> budget keeper (published, no reply): holds whose spend a provider actor
#: keeps on disk because the event log refused it (``BudgetPending``); not expired meanwhile.
BUDGET_PENDING = "vapora.budget.pending"
#: Provider actors -> routers (published, no reply): attempts whose call ended with nothing
#: billed, or was not made, by the spend ids their routers named (``AttemptsUnbilled``): a
#: router that stopped waiting for one no longer says its hold is pending.
BUDGET_UNBILLED = "vapora.budget.unbilled"

EVENT_STREAM = "VAPORA_EVENTS"
EVENTS_PREFIX = "vapora.events"
EVENTS_WILDCARD = "vapora.events.>"

_PROVIDER_CALL = "vapora.provider.{name}.call"

#: A request header: ``request`` says its ``task_id`` names this request alone (a client made it
#: up), so no other request of the task may run on another router at the same time.
TASK_SCOPE_HEADER = "Vapora-Task-Scope"

#: NATS's default reply-subject prefix (every inbox is ``_INBOX.<unique>`` without a user).
INBOX = "_INBOX"
_USER_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def inbox_prefix(
    user: str | None, servers: Sequence[str] = (), *, token_or_creds: bool = False
) -> str:
    """The prefix of the reply subjects a connection as NATS user ``user`` listens on:
    ``_INBOX.<user>``, so that a deployment can let each user receive its own replies only
    (``vapora.deploy`` allows each user ``_INBOX.<user>.>``). Without ``user``, the user named
    in the first server URL with its password (``nats://user:password@host``; a URL's user-info
    without a password is a token, never put in a subject), unless the connection
    authenticates with a token or a credentials file (``token_or_creds``). Without a user, or
    with a name that is not one plain subject token, NATS's default ``_INBOX``."""
    if user is None and servers and not token_or_creds:
        parts = urlsplit(servers[0])
        user = parts.username if parts.password is not None else None
    if user is None or _USER_TOKEN.fullmatch(user) is None:
        return INBOX
    return f"{INBOX}.{user}"


# Event tag -> the subject family it is appended under.
_EVENT_FAMILY = {
    "route_decided": "route",
    "fallback_triggered": "route",
    "call_succeeded": "call",
    "call_failed": "call",
    "spend_recorded": "spend",
    "provider_health_changed": "health",
    "budget_reserved": "budget",
    "budget_released": "budget",
    "budget_tier_changed": "budget",
    "budget_leased": "budget",
    "budget_lease_returned": "budget",
}


def provider_call(name: str) -> str:
    """The subject a provider actor named ``name`` serves calls on."""
    return _PROVIDER_CALL.format(name=name)


def event_subject(event_type: str, provider: str | None = None, prefix: str = EVENTS_PREFIX) -> str:
    """The subject an event of ``event_type`` is appended to.

    Provider-written events are further split by provider so that each provider's actors (and
    their NATS permissions) own a subject; budget events share one subject, the keeper's fence.
    """
    family = _EVENT_FAMILY.get(event_type, "other")
    if provider is not None and family in ("call", "spend", "health"):
        return f"{prefix}.{family}.{provider}"
    return f"{prefix}.{family}"
