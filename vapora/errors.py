"""vapora's one exception tree.

::

    VaporaError               status, code: how it crosses NATS (DESIGN §3)
    ├── ConfigError           bad config file or flag                  500 config_error
    ├── InvalidRequest        malformed or invalid message             400 invalid_request
    ├── UnknownProvider       override names no configured provider    404 unknown_provider
    ├── UnknownTaskType       task type with no mapping                404 unknown_task_type
    ├── BudgetExceeded        nothing admissible within the budget     402 budget_exceeded
    ├── NoProviderAvailable   every candidate unavailable or failed    503 no_provider_available
    ├── RequestTimeout        the task ran out of time                 504 timeout
    ├── ConcurrencyConflict   a fenced append lost to another writer   409 conflict
    ├── InternalError         a bug; says no more than needed          500 internal
    └── ProviderError         one provider call failed (provider, HTTP status, error type)
        ├── ProviderUnavailable     transient: 5xx, 529, 408, reset    -> fall back
        │   └── ProviderTimeout     no first token / answer in time    -> fall back
        ├── ProviderRateLimited     429 with ``retry_after`` seconds   -> fall back
        ├── ProviderQuotaExhausted  billing/quota used up              -> fall back
        ├── ProviderConfigError     401/403/404: our key or model      -> fall back
        ├── ProviderRejected        400/413/422: the caller's request  502 provider_error
        │   └── ProviderContextOverflow  the input exceeds the model's context window
        │                                -> the next model in the chain (``[routing]
        │                                   context_overflow_fallback``), else 502
        └── ProviderStreamBroken    failed after the first chunk       no fallback; partial usage

Foreign exceptions (httpx, nats) are translated at the boundary with ``raise ... from exc``.
No error message ever contains an API key: provider messages are scrubbed by the clients.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Self

from events.contract import Price, TaskType, Usage

__all__ = [
    "BudgetExceeded",
    "ConcurrencyConflict",
    "ConfigError",
    "InternalError",
    "InvalidRequest",
    "NoProviderAvailable",
    "NotConnected",
    "Overloaded",
    "ProviderConfigError",
    "ProviderContextOverflow",
    "ProviderError",
    "ProviderQuotaExhausted",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderStreamBroken",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RequestTimeout",
    "UnknownProvider",
    "UnknownTaskType",
    "VaporaError",
    "describe",
    "error_for_code",
    "request_error",
    "is_error_type",
]


class VaporaError(Exception):
    """Base of every vapora error; ``code`` and ``status`` are its NATS service-error form."""

    code = "internal"
    status = 500
    #: The task it ended, once there is one, and what the task's failed attempt cost when that
    #: is known: sent with the error's answer (``ErrorReply``, a stream's ``StreamError``).
    task_id: str | None = None
    task_usage: Usage | None = None
    task_cost_usd: Decimal | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def of_task(
        self, task_id: str | None, usage: Usage | None = None, cost_usd: Decimal | None = None
    ) -> Self:
        """This error, naming ``task_id`` (and, when known, what its attempt cost)."""
        self.task_id = task_id
        if cost_usd is not None:
            self.task_usage, self.task_cost_usd = usage, cost_usd
        return self


class ConfigError(VaporaError):
    code = "config_error"


class InvalidRequest(VaporaError):
    code = "invalid_request"
    status = 400


class UnknownProvider(VaporaError):
    code = "unknown_provider"
    status = 404


class UnknownTaskType(VaporaError):
    code = "unknown_task_type"
    status = 404


class BudgetExceeded(VaporaError):
    code = "budget_exceeded"
    status = 402


class NoProviderAvailable(VaporaError):
    code = "no_provider_available"
    status = 503


class NotConnected(NoProviderAvailable):
    """``vapora.Client.connect`` could not reach NATS (no server at the URL, or it would not
    have us): nothing was asked of vapora. A :class:`NoProviderAvailable` (what it was before
    it had a class of its own), told apart by its class and ``code``; never a NATS reply."""

    code = "not_connected"


class RequestTimeout(VaporaError):
    code = "timeout"
    status = 504


class ConcurrencyConflict(VaporaError):
    code = "conflict"
    status = 409


class InternalError(VaporaError):
    code = "internal"
    status = 500


#: What an error type may be: an identifier, as every provider's are (``overloaded_error``,
#: ``rate_limit_exceeded``, ``RESOURCE_EXHAUSTED``).
_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")


def describe(exc: BaseException) -> str:
    """An exception as a log line or a message names it: its type and text, its type alone
    when it has no text (a bare ``TimeoutError``)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_error_type(value: object) -> bool:
    """Whether ``value`` may be a provider error's type (:data:`_TYPE`)."""
    return isinstance(value, str) and _TYPE.fullmatch(value) is not None


class ProviderError(VaporaError):
    """One provider call failed. ``usage`` is what the provider billed regardless (often zero)."""

    code = "provider_error"
    status = 502
    error_class = "provider_error"
    fallback = True

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        http_status: int | None = None,
        error_type: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.http_status = http_status
        # A provider's error type goes to events, span attributes and metric labels: only a
        # short identifier is taken (a server may put anything there, the request's key or
        # text included); anything else is no type.
        self.error_type = error_type if is_error_type(error_type) else None
        self.usage = usage or Usage()
        # Whether vapora estimated (bounded) any of ``usage``'s counts: the provider stated
        # none (a cut stream, a time-out, a body that broke off). The GenAI token metric leaves
        # such counts out, as the conventions ask; the spend is recorded either way.
        self.usage_estimated = False
        # The price ``usage`` is billed at when not the call's usual one (an OpenAI answer that
        # said it was served at another service tier before the call failed); None: the usual.
        self.price: Price | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(provider={self.provider!r}, http_status={self.http_status!r}, "
            f"error_type={self.error_type!r}, message={self.message!r})"
        )


class ProviderUnavailable(ProviderError):
    error_class = "transient"


class ProviderTimeout(ProviderUnavailable):
    error_class = "timeout"


class ProviderRateLimited(ProviderError):
    error_class = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ProviderQuotaExhausted(ProviderError):
    error_class = "quota_exhausted"


class ProviderConfigError(ProviderError):
    error_class = "configuration"


class ProviderRejected(ProviderError):
    """The provider rejected the caller's request (400/413/422): no other provider would differ."""

    error_class = "caller_error"
    fallback = False


class ProviderContextOverflow(ProviderRejected):
    """The provider rejected the input as longer than its model's context window. A caller
    error for this model only: a model with a larger window may take it, so the router moves on
    to the next model in the chain unless ``[routing] context_overflow_fallback`` is off."""

    error_class = "context_overflow"


class ProviderStreamBroken(ProviderError):
    """The call failed after its first chunk was forwarded: the caller already has partial text."""

    error_class = "stream_broken"
    fallback = False


class Overloaded(VaporaError):
    """An actor's concurrency and backlog are both full, or it is stopping: try again shortly
    (503). Its reply may say the request's outcome is unknown (it was cut while running)."""

    code = "overloaded"
    status = 503


_BY_CODE: dict[str, type[VaporaError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnknownProvider,
        UnknownTaskType,
        BudgetExceeded,
        NoProviderAvailable,
        RequestTimeout,
        ConcurrencyConflict,
        InternalError,
        ConfigError,
        Overloaded,
    )
}


def error_for_code(code: str, message: str) -> VaporaError:
    """Rebuild our exception from a contract error reply (used by :class:`vapora.Client`)."""
    if code == ProviderError.code:
        return ProviderRejected(message, provider="")
    return _BY_CODE.get(code, InternalError)(message)


_NOT_A_TASK_TYPE = re.compile(r"Invalid enum value (.*) - at `\$\.task_type`", re.DOTALL)


def request_error(message: str) -> VaporaError:
    """The error for a ``CompletionRequest`` that cannot be read, from the decoder's
    ``message``: 404 ``unknown_task_type`` for a task type outside the seven (DESIGN §3; it was
    a 400), else 400 ``invalid_request`` naming what was wrong."""
    found = _NOT_A_TASK_TYPE.fullmatch(message)
    if found is None:
        return InvalidRequest(message)
    known = ", ".join(t.value for t in TaskType)
    return UnknownTaskType(f"`task_type` {found.group(1)} is not a task type; vapora's: {known}")
