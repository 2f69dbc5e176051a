"""The routing decision as a pure function (DESIGN §4): which providers to try, in which order, why.

:func:`decide` takes every input as a value (the request, the config, each provider's availability
view, this request's estimated cost per provider, the budget tier, the task's remaining budget and
``now``) and returns a :class:`~events.contract.RouteDecision`. No I/O, no clock, no randomness;
what depends only on the (immutable) config, each task type's candidates and their mapping
verdicts, is worked out once per config and reused.

The guide's order, each step recorded as a :class:`~events.contract.FilterVerdict` per candidate:

1. **override**: ``request.provider`` names the only candidate (unknown name: ``UnknownProvider``);
   no fallback, because an override goes where it says.
2. **mapping**: the task type's rule, else the guide's default mapping (none: ``UnknownTaskType``);
   configured zero-cost providers outside the mapping are appended as last resort (a knob), so the
   chain ends with a free provider only when one is configured.
3. **availability**: API key set, not rate limited at ``now``, breaker closed, health ok.
4. **budget**: this request's estimated cost fits the task's remaining cap.
5. **tier**: Normal scores; NearThreshold prefers the cheapest adequate candidate; Exceeded admits
   only zero-cost providers (none: ``BudgetExceeded``).
6. **latency**: with ``latency_required_ms``, candidates observed slower than it are dropped when
   another candidate can meet it.
7. **score** (kept candidates)::

       score = w_q * quality_term + w_c * cost_term + w_l * latency_term   (weights: config)
       quality_term = clamp(q - penalty * max(0, required - q), 0, 1)
       cost_term    = 1 - cost / max(cost of kept candidates)     (1 when all are free)
       latency_term = 1 / (1 + latency_ms / 1000)                  (unknown: median of the known)

   ``q`` is the candidate's configured quality, ``required`` the level of the request's quality
   (``routing.required_quality``), ``penalty`` is ``routing.shortfall_penalty``. A candidate meeting
   the requirement keeps its own quality, so a better model still scores higher; one below it loses
   ``penalty`` times its shortfall on top. Scores are rounded to 6 places; ties break by mapping
   order.

The chain is every kept candidate: the chosen one first, then the rest in the tier's order (score,
or cheapest adequate first), last-resort providers always after the mapped ones. When nothing is
kept the error (:class:`RouteUnavailable` or :class:`RouteOverBudget`) carries the partial decision
as ``.decision`` so the router can still append it as ``route_decided``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import msgspec

from events.contract import (
    Candidate,
    CompletionRequest,
    FilterVerdict,
    Quality,
    RouteDecision,
    TaskType,
    Tier,
    cents_to_usd,
)
from events.log import ProviderHealthChanged
from vapora.config import Config, ProviderConfig, key_not_set
from vapora.errors import BudgetExceeded, NoProviderAvailable, UnknownProvider, UnknownTaskType

__all__ = [
    "ProviderView",
    "combined_view",
    "RouteOverBudget",
    "RouteUnavailable",
    "decide",
    "task_cap_usd",
    "remaining_usd",
]


class ProviderView(msgspec.Struct, frozen=True, kw_only=True):
    """What the router knows about one provider now (its projection of ``provider_health_changed``).

    ``api_key_present``: the provider's ``api_key_env`` is set where the provider runs.
    ``rate_limited_until``: unavailable before this instant (a 429's ``retry-after``).
    ``breaker_open``: its circuit breaker is open. ``healthy`` / ``health_reason``: its last health
    check. ``latency_ms``: its observed latency estimate (None: no observation yet).
    """

    api_key_present: bool = True
    rate_limited_until: datetime | None = None
    breaker_open: bool = False
    healthy: bool = True
    health_reason: str = ""
    latency_ms: float | None = None


def combined_view(live: Sequence[ProviderHealthChanged], api_key_env: str | None) -> ProviderView:
    """A provider's view from the last ``provider_health_changed`` of each of its live
    instances (the most recently heard last): several actor processes may serve one provider,
    each with its own environment (its API key), breaker and limiter, and a call goes to any
    of those with the key. None live: the view before any word."""
    if not live:
        return ProviderView()

    missing = key_not_set(api_key_env) if api_key_env is not None else None

    def keyless(e: ProviderHealthChanged) -> bool:  # its own finding, as its health
        return not e.available and e.reason == missing

    serving = [e for e in live if not keyless(e)]  # only instances with the key take calls
    if not serving:
        return ProviderView(api_key_present=False, latency_ms=live[-1].latency_estimate_ms)
    limits = [e.rate_limited_until for e in serving if e.rate_limited_until is not None]
    unhealthy = [
        e
        for e in serving
        if not (e.available or e.breaker == "open" or e.rate_limited_until is not None)
    ]
    latencies = [e.latency_estimate_ms for e in serving if e.latency_estimate_ms is not None]
    open_ = sum(e.breaker == "open" for e in serving)  # (none of them counted unhealthy)
    # Healthy while one instance can take a call: neither unhealthy nor its breaker open. (One
    # instance unhealthy and the other's breaker open left none, and the provider was taken
    # for available, its first attempt failing before the fallback: a review.)
    healthy = not unhealthy or len(unhealthy) + open_ < len(serving)
    reason = ""
    if not healthy:
        reason = unhealthy[-1].reason
        if open_:
            reason += f" (and {open_} instance(s) with the breaker open)"
    return ProviderView(
        # The provider's limit (its 429s are the key's, shared): any instance's stands.
        rate_limited_until=max(limits) if limits else None,
        # Each instance's own breaker: the provider is closed off when all of them are.
        breaker_open=open_ == len(serving),
        healthy=healthy,
        health_reason=reason,
        latency_ms=latencies[-1] if latencies else None,
    )


class RouteUnavailable(NoProviderAvailable):
    """Every candidate was dropped; ``decision`` records each one's reason (503)."""

    def __init__(self, message: str, decision: RouteDecision) -> None:
        super().__init__(message)
        self.decision = decision


class RouteOverBudget(BudgetExceeded):
    """Nothing admissible within the budget (task cap or Exceeded tier); see ``decision`` (402)."""

    def __init__(self, message: str, decision: RouteDecision) -> None:
        super().__init__(message)
        self.decision = decision


# --- helpers for callers ------------------------------------------------------------------------


def task_cap_usd(config: Config, request: CompletionRequest) -> Decimal | None:
    """The task's cap in USD: the config's per-task limit, lowered (never raised) by the request."""
    limits = [config.budget.per_task_limit_usd]
    if request.budget_cents is not None:
        limits.append(cents_to_usd(request.budget_cents))
    known = [x for x in limits if x is not None]
    return min(known) if known else None


def remaining_usd(cap: Decimal | None, spent_usd: Decimal) -> Decimal | None:
    """What a cap leaves after ``spent_usd``, never below zero; None: no cap."""
    return None if cap is None else max(Decimal(0), cap - spent_usd)


# --- the working state of one decision ----------------------------------------------------------

_OVERRIDE = "manual override"
_LAST_RESORT = "last resort"


_UNKNOWN = ProviderView()  # a provider without a view: assumed available, latency unknown


@dataclass(slots=True, kw_only=True)
class _Context:
    # Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__.
    request: CompletionRequest
    config: Config
    now: datetime
    views: Mapping[str, ProviderView]
    costs: Mapping[str, Decimal]
    tier: Tier
    remaining: Decimal | None
    required: float  # the quality level the request requires

    def view(self, name: str) -> ProviderView:
        return self.views.get(name, _UNKNOWN)


class _Slot:
    """One candidate: where it came from and what the filters said.

    Private to one decision and judged in place (a frozen copy per verdict was a third of the
    decision's cost); ``kept`` turns false at the first verdict that drops it.
    """

    __slots__ = ("kept", "name", "position", "provider", "role", "score", "verdicts")

    def __init__(
        self,
        *,
        name: str,
        position: int,
        role: str,
        provider: ProviderConfig | None,
        mapping: FilterVerdict,
    ) -> None:
        self.name = name
        self.position = position
        self.role = role
        self.provider = provider
        self.verdicts: list[FilterVerdict] = [mapping]  # the first filter's, known in advance
        self.score: float | None = None
        self.kept = mapping.passed

    @property
    def last_resort(self) -> bool:
        return self.role == _LAST_RESORT

    def judged(self, verdict: FilterVerdict) -> _Slot:
        self.verdicts.append(verdict)
        if not verdict.passed:
            self.kept = False
        return self


def _ok(name: str, reason: str) -> FilterVerdict:
    return FilterVerdict(filter=name, passed=True, reason=reason)


def _drop(name: str, reason: str) -> FilterVerdict:
    return FilterVerdict(filter=name, passed=False, reason=reason)


def _usd(amount: Decimal) -> str:
    return f"${amount:.6f}"


# Verdicts that never vary (frozen values, shared by every decision).
_OVERRIDE_MAPPED = _ok("mapping", "manual override")
_AVAILABLE = _ok("availability", "available")
_TIER_VERDICTS = {
    Tier.NORMAL: _ok("tier", "Normal tier"),
    Tier.NEAR_THRESHOLD: _ok(
        "tier", "NearThreshold tier: the cheapest adequate candidate is preferred"
    ),
}
_EXCEEDED_FREE = _ok("tier", "zero-cost, admitted in the Exceeded tier")
_EXCEEDED_PAID = _drop("tier", "the Exceeded tier admits only zero-cost providers")


# --- what every decision under one config shares ------------------------------------------------

# A candidate before any per-request filter: name, position, role, provider, mapping verdict.
_Spec = tuple[str, int, str, ProviderConfig | None, FilterVerdict]


class _Shared:
    """What decisions under one config compute alike, built once (a config is immutable): each
    task type's candidates with their mapping verdicts, and the quality each level requires."""

    __slots__ = ("config", "levels", "specs")

    def __init__(self, config: Config) -> None:
        self.config = config
        required = config.routing.required_quality
        self.levels = {quality: required.level(quality) for quality in Quality}
        self.specs: dict[TaskType, tuple[_Spec, ...] | None] = {}

    def mapped(self, task_type: TaskType) -> tuple[_Spec, ...] | None:
        if task_type not in self.specs:
            self.specs[task_type] = _mapped_specs(self.config, task_type)
        return self.specs[task_type]


_SHARED: dict[int, _Shared] = {}
_SHARED_MAX = 16  # configs remembered at once (a process has one; tests make many)


def _shared(config: Config) -> _Shared:
    shared = _SHARED.get(id(config))
    if shared is None or shared.config is not config:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        shared = _SHARED[id(config)] = _Shared(config)
    return shared


# --- step 1-2: candidates -----------------------------------------------------------------------


def _override_slots(ctx: _Context, name: str) -> list[_Slot]:
    provider = ctx.config.provider(name)
    if provider is None:
        known = ", ".join(p.name for p in ctx.config.providers)
        raise UnknownProvider(f"unknown provider {name!r} (configured: {known})")
    return [
        _Slot(name=name, position=0, role=_OVERRIDE, provider=provider, mapping=_OVERRIDE_MAPPED)
    ]


def _mapped_slots(ctx: _Context, shared: _Shared) -> list[_Slot]:
    task_type = ctx.request.task_type
    specs = shared.mapped(task_type)
    if specs is None:
        raise UnknownTaskType(f"no mapping for task type {task_type.value}: add a routing rule")
    return [_Slot(name=n, position=i, role=r, provider=p, mapping=v) for n, i, r, p, v in specs]


def _mapped_specs(config: Config, task_type: TaskType) -> tuple[_Spec, ...] | None:
    """The task type's candidates (its mapping, then any zero-cost last resort) and each one's
    mapping verdict; None when the task type has no mapping."""
    mapping = config.mapping(task_type)
    if mapping is None:
        return None
    task = task_type.value
    source = "rule" if config.rule(task_type) else "guide's default mapping"
    roles = ["primary"] + [f"fallback {i}" for i in range(1, len(mapping))]
    specs: list[_Spec] = []
    for i, (name, role) in enumerate(zip(mapping, roles, strict=True)):
        provider = config.provider(name)
        verdict = (
            _drop("mapping", f"{name} is in the {task} mapping but not configured")
            if provider is None
            else _ok("mapping", f"{role} in the {task} {source}")
        )
        specs.append((name, i, role, provider, verdict))
    return tuple(specs + _last_resort_specs(config, task, set(mapping), len(mapping)))


def _last_resort_specs(config: Config, task: str, mapped: set[str], start: int) -> list[_Spec]:
    if not config.routing.zero_cost_last_resort:
        return []
    free = [p for p in config.providers if p.zero_cost and p.name not in mapped]
    free.sort(key=lambda p: p.priority)  # stable: config order breaks equal priorities
    verdict = _ok("mapping", f"zero-cost last resort (not in the {task} mapping)")
    return [(p.name, start + i, _LAST_RESORT, p, verdict) for i, p in enumerate(free)]


# --- steps 3-5: per-candidate filters -----------------------------------------------------------


def _availability_verdict(slot: _Slot, ctx: _Context) -> FilterVerdict:
    assert slot.provider is not None  # the mapping verdict dropped unconfigured names
    view, reasons = ctx.view(slot.name), []
    if not view.api_key_present and slot.provider.api_key_env is not None:
        reasons.append(f"{slot.provider.api_key_env} is not set")
    if view.rate_limited_until is not None and ctx.now < view.rate_limited_until:
        reasons.append(f"rate limited until {view.rate_limited_until.isoformat()}")
    if view.breaker_open:
        reasons.append("circuit breaker open")
    if not view.healthy:
        reasons.append(f"health check failing: {view.health_reason or 'no reason given'}")
    return _drop("availability", "; ".join(reasons)) if reasons else _AVAILABLE


def _budget_verdict(slot: _Slot, ctx: _Context) -> FilterVerdict:
    cost = ctx.costs.get(slot.name)
    if cost is None:
        return _drop("budget", "no cost estimate for this request")
    if ctx.remaining is None:
        return _ok("budget", f"estimated {_usd(cost)}; no per-task cap")
    if cost > ctx.remaining:
        return _drop(
            "budget", f"estimated {_usd(cost)} exceeds the task's remaining {_usd(ctx.remaining)}"
        )
    return _ok(
        "budget", f"estimated {_usd(cost)} within the task's remaining {_usd(ctx.remaining)}"
    )


def _tier_verdict(slot: _Slot, ctx: _Context) -> FilterVerdict:
    assert slot.provider is not None
    if ctx.tier is Tier.EXCEEDED:
        return _EXCEEDED_FREE if slot.provider.zero_cost else _EXCEEDED_PAID
    return _TIER_VERDICTS[ctx.tier]


# After the mapping's verdict, which each slot is born with (see _Shared).
_FILTERS: tuple[Callable[[_Slot, _Context], FilterVerdict], ...] = (
    _availability_verdict,
    _budget_verdict,
    _tier_verdict,
)


def _filtered(slot: _Slot, ctx: _Context) -> _Slot:
    """Apply the filters in order; a dropped candidate is not judged further."""
    for check in _FILTERS:
        if not slot.kept:
            break
        slot.judged(check(slot, ctx))
    return slot


# --- step 6: latency ----------------------------------------------------------------------------


def _meets(slot: _Slot, ctx: _Context, required_ms: int) -> bool:
    observed = ctx.view(slot.name).latency_ms
    return observed is None or observed <= required_ms


def _latency_filtered(slots: list[_Slot], ctx: _Context) -> list[_Slot]:
    required = ctx.request.latency_required_ms
    kept = [s for s in slots if s.kept]
    if required is None or not kept:
        return slots
    anyone = any(_meets(s, ctx, required) for s in kept)
    return [_latency_judged(s, ctx, required, anyone) if s.kept else s for s in slots]


def _latency_judged(slot: _Slot, ctx: _Context, required: int, anyone: bool) -> _Slot:
    observed = ctx.view(slot.name).latency_ms
    if _meets(slot, ctx, required):
        seen = "no observation yet" if observed is None else f"observed {observed:.0f} ms"
        return slot.judged(_ok("latency", f"{seen}; required {required} ms"))
    if anyone:
        reason = f"observed {observed:.0f} ms, slower than the required {required} ms"
        return slot.judged(_drop("latency", reason))
    return slot.judged(_ok("latency", f"no candidate meets {required} ms; kept"))


# --- step 7: score and order --------------------------------------------------------------------


def _quality_term(quality: float, required: float, penalty: float) -> float:
    shortfall = max(0.0, required - quality)
    return min(1.0, max(0.0, quality - penalty * shortfall))


def _latency_terms(kept: Sequence[_Slot], ctx: _Context) -> dict[str, float]:
    observed = {s.name: ctx.view(s.name).latency_ms for s in kept}
    terms = {n: 1.0 / (1.0 + ms / 1000.0) for n, ms in observed.items() if ms is not None}
    neutral = _median(list(terms.values())) if terms else 1.0
    return {s.name: terms.get(s.name, neutral) for s in kept}


def _median(values: list[float]) -> float:
    """``statistics.median``, without its generality (a tenth of its cost here)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _scored(slots: list[_Slot], ctx: _Context) -> list[_Slot]:
    """Score the kept candidates in place."""
    costs = ctx.costs
    kept = [s for s in slots if s.kept]
    dearest = max((costs[s.name] for s in kept), default=Decimal(0))
    latency = _latency_terms(kept, ctx)
    routing = ctx.config.routing
    w, required, penalty = routing.weights, ctx.required, routing.shortfall_penalty
    for slot in kept:
        if slot.provider is not None:
            cost_term = 1.0 if dearest == 0 else float(1 - costs[slot.name] / dearest)
            quality_term = _quality_term(slot.provider.quality, required, penalty)
            score = w.quality * quality_term + w.cost * cost_term + w.latency * latency[slot.name]
            slot.score = round(score, 6)
    return slots


def _adequate(slot: _Slot, ctx: _Context) -> bool:
    return slot.provider is not None and slot.provider.quality >= ctx.required


def _order_key(slot: _Slot, ctx: _Context) -> tuple[object, ...]:
    score = -(slot.score or 0.0)
    if ctx.tier is Tier.NEAR_THRESHOLD:
        cost = ctx.costs[slot.name]
        return (slot.last_resort, not _adequate(slot, ctx), cost, score, slot.position)
    return (slot.last_resort, score, slot.position)


# --- the decision -------------------------------------------------------------------------------


def _candidate(slot: _Slot, ctx: _Context) -> Candidate:
    return Candidate(
        provider=slot.name,
        model=slot.provider.model if slot.provider is not None else "",
        verdicts=list(slot.verdicts),
        score=slot.score,
        estimated_cost_usd=ctx.costs.get(slot.name),
        kept=slot.kept,
    )


def _dropped_summary(slots: Sequence[_Slot]) -> str:
    dropped = [f"{s.name} ({s.verdicts[-1].reason})" for s in slots if not s.kept]
    return f"; dropped: {', '.join(dropped)}" if dropped else ""


def _reason(chosen: _Slot, slots: Sequence[_Slot], ctx: _Context) -> str:
    req = ctx.request
    what = f"{req.task_type.value} at {req.quality.value} quality, {ctx.tier.value} tier"
    if chosen.role == _OVERRIDE:
        why = "manual override"
    elif chosen.last_resort:
        why = "zero-cost last resort: no mapped candidate was kept"
    elif ctx.tier is Tier.EXCEEDED:
        why = "only zero-cost providers are admitted in the Exceeded tier"
    elif ctx.tier is Tier.NEAR_THRESHOLD:
        adequate = "adequate " if _adequate(chosen, ctx) else ""
        # Of the mapped ones: a kept last resort comes after them whatever its cost (the
        # reason said "the cheapest" of a free last resort's dearer peer, a review).
        mapped = "mapped " if any(s.kept and s.last_resort for s in slots) else ""
        why = f"the cheapest {adequate}{mapped}candidate near the budget threshold"
    else:
        why = f"the best score ({chosen.score:.3f}) of {sum(s.kept for s in slots)} kept"
    return f"{chosen.name} for {what}: {why}{_dropped_summary(slots)}"


def _fail(slots: Sequence[_Slot], ctx: _Context) -> RouteUnavailable | RouteOverBudget:
    reasons = "; ".join(f"{s.name}: {s.verdicts[-1].reason}" for s in slots)
    task = ctx.request.task_type.value
    budget_drop = any(s.verdicts[-1].filter in ("budget", "tier") for s in slots)
    decision = RouteDecision(
        reason=f"no provider for {task}: {reasons}",
        chain=[],
        candidates=[_candidate(s, ctx) for s in slots],
        tier=ctx.tier,
    )
    if ctx.tier is Tier.EXCEEDED or budget_drop:
        return RouteOverBudget(f"no provider within the budget for {task}: {reasons}", decision)
    return RouteUnavailable(f"no provider available for {task}: {reasons}", decision)


def decide(
    request: CompletionRequest,
    config: Config,
    *,
    now: datetime,
    views: Mapping[str, ProviderView],
    estimated_costs: Mapping[str, Decimal],
    tier: Tier = Tier.NORMAL,
    task_remaining_usd: Decimal | None = None,
) -> RouteDecision:
    """Decide which providers to try for ``request``, in order, and record why.

    ``views``: each provider's availability (missing: assumed available, latency unknown).
    ``estimated_costs``: this request's estimated cost in USD per provider name (from pricing:
    the reservation estimate); a provider without one is dropped by the budget filter.
    ``tier``: the budget keeper's current tier. ``task_remaining_usd``: what the task may still
    spend (:func:`remaining_usd` of its :func:`task_cap_usd`; None: no cap). ``now``: for
    rate-limit expiry.

    Raises ``UnknownProvider`` (bad override) or ``UnknownTaskType`` (no mapping). When nothing
    is kept: :class:`RouteOverBudget` (402) if the tier is Exceeded or some candidate was dropped
    by the task budget, else :class:`RouteUnavailable` (503); both carry ``.decision``.
    """
    shared = _shared(config)
    ctx = _Context(
        request=request,
        config=config,
        now=now,
        views=views,
        costs=estimated_costs,
        tier=tier,
        remaining=task_remaining_usd,
        required=shared.levels[request.quality],
    )
    if request.provider is not None:
        slots = _override_slots(ctx, request.provider)
    else:
        slots = _mapped_slots(ctx, shared)
    slots = _scored(_latency_filtered([_filtered(s, ctx) for s in slots], ctx), ctx)
    chain = sorted((s for s in slots if s.kept), key=lambda s: _order_key(s, ctx))
    if not chain:
        raise _fail(slots, ctx)
    return RouteDecision(
        reason=_reason(chain[0], slots, ctx),
        chain=[s.name for s in chain],
        candidates=[_candidate(s, ctx) for s in slots],
        tier=tier,
    )
