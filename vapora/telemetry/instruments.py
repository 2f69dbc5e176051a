"""The metric instruments: the GenAI client metrics (v1.41) and the guide's six, plus spend and
the budget tier. Actors call the ``record_*`` methods; names, units and buckets come from
:mod:`vapora.telemetry.semconv`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from events.contract import Usage
from vapora.telemetry.histograms import Histogram
from vapora.telemetry.semconv import (
    DURATION_BUCKETS,
    GUIDE_LATENCY_BUCKETS,
    METRICS,
    TIER_VALUES,
    TOKEN_BUCKETS,
    TOKEN_INPUT,
    TOKEN_OUTPUT,
    GenAINames,
)

__all__ = ["BudgetSource", "CallOutcome", "Instruments", "watch_budget"]

Attributes = Mapping[str, str | int]


@dataclass(kw_only=True, slots=True)
class CallOutcome:
    """One provider call as the metrics see it.

    ``genai``: the GenAI metric attributes (operation, provider, request model, server, and the
    response model on success). ``status``: ``ok`` or the error class. ``error_type``: the
    GenAI ``error.type`` on failure. ``usage``: billed tokens (``None`` when unknown);
    ``usage_estimated``: some of its counts are vapora's bounds, not the provider's.
    """

    genai: Attributes
    provider: str
    task_type: str
    status: str
    duration_s: float
    time_to_first_chunk_s: float | None = None
    usage: Usage | None = None
    cost_usd: Decimal = Decimal(0)
    error_type: str | None = None
    usage_estimated: bool = False


Key = tuple[tuple[str, str], ...]


class _Sums:
    """Running totals per label set, summed in plain dictionaries on the hot path (a dict
    update, not an SDK measurement) and handed to the SDK when a reader collects (an observable
    counter's callback). Copying a dict is atomic in CPython, so a collection in another thread
    (the ``/metrics`` server) reads a consistent snapshot."""

    def __init__(self) -> None:
        self.totals: dict[Key, int | Decimal] = {}

    def add(self, amount: int | Decimal, key: Key) -> None:
        self.totals[key] = self.totals.get(key, 0) + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        for key, total in self.totals.copy().items():
            yield Observation(float(total) if isinstance(total, Decimal) else total, dict(key))


#: What the budget keepers of this process counted against the budget, as
#: ``((period, spent in USD), ...)``: each keeper registers a function giving it
#: (:func:`watch_budget`), read when a reader collects.
BudgetSource = Callable[[], Iterable[tuple[str, Decimal]]]
_BUDGET_SOURCES: list[BudgetSource] = []


def watch_budget(source: BudgetSource) -> Callable[[], None]:
    """Report ``source``'s spend as ``vapora_budget_spent_usd`` (per ``period``: ``day``,
    ``month``) in every meter provider of this process; returns the function that stops it."""
    _BUDGET_SOURCES.append(source)

    def unwatch() -> None:
        if source in _BUDGET_SOURCES:
            _BUDGET_SOURCES.remove(source)

    return unwatch


def _observe_budget(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_BUDGET_SOURCES):
        for period, spent in source():
            yield Observation(float(spent), {METRICS.period: period})


class Instruments:
    """Every instrument vapora records, created once per meter provider.

    Histograms are the SDK's (its bucket aggregation), recorded through
    :class:`~vapora.telemetry.histograms.Histogram` (the SDK's aggregations, fed directly once an
    attribute set has been seen); counters are :class:`_Sums` behind observable counters,
    because an SDK counter measurement costs about as much as a histogram one and a provider
    call adds seven of them.
    """

    def __init__(self, meter: Meter, names: GenAINames) -> None:
        self.names = names
        self.token_usage = self._histogram(
            meter,
            names.token_usage,
            "{token}",
            "Number of input and output tokens used",
            TOKEN_BUCKETS,
        )
        self.duration = self._histogram(
            meter, names.operation_duration, "s", "GenAI operation duration", DURATION_BUCKETS
        )
        self.first_chunk = self._histogram(
            meter,
            names.time_to_first_chunk,
            "s",
            "Time to receive the first chunk of a streaming response",
            DURATION_BUCKETS,
        )
        self.latency = self._histogram(
            meter, METRICS.latency, "s", "Provider latency", GUIDE_LATENCY_BUCKETS
        )
        self.requests = self._counter(meter, METRICS.requests, "1", "Total LLM requests")
        self.tokens = self._counter(meter, METRICS.tokens, "1", "Tokens used")
        self.decisions = self._counter(meter, METRICS.routing_decisions, "1", "Routing decisions")
        self.fallbacks = self._counter(
            meter, METRICS.fallback_triggers, "1", "Fallback chain activations"
        )
        self.enforcement = self._counter(
            meter, METRICS.budget_enforcement, "1", "Budget tier changes and actions"
        )
        self.spend = self._counter(meter, METRICS.spend, "USD", "Spend recorded, in US dollars")
        self.tier = meter.create_gauge(
            METRICS.tier,
            unit="1",
            description="Budget tier: 0 Normal, 1 NearThreshold, 2 Exceeded",
        )
        meter.create_observable_gauge(
            METRICS.budget_spent,
            callbacks=[_observe_budget],
            unit="USD",
            description="Spend counted against the budget today and this month (UTC), in USD",
        )

    @staticmethod
    def _histogram(
        meter: Meter, name: str, unit: str, description: str, buckets: Sequence[float]
    ) -> Histogram:
        return Histogram(
            meter.create_histogram(
                name,
                unit=unit,
                description=description,
                explicit_bucket_boundaries_advisory=buckets,
            )
        )

    @staticmethod
    def _counter(meter: Meter, name: str, unit: str, description: str) -> _Sums:
        sums = _Sums()
        meter.create_observable_counter(
            name, callbacks=[sums.observe], unit=unit, description=description
        )
        return sums

    def record_call(self, call: CallOutcome) -> None:
        """A provider call that reached the provider (succeeded or failed)."""
        n = self.names
        genai = call.genai
        key = tuple(genai.items())  # the attribute set's key for the histograms' fast path
        if call.error_type is None:
            self.duration.record(call.duration_s, key, genai)
            if call.time_to_first_chunk_s is not None:
                self.first_chunk.record(call.time_to_first_chunk_s, key, genai)
        else:
            # A stream broken after its first chunk: its time to it too, under its error type.
            failed = {**genai, n.error_type: call.error_type}
            self.duration.record(call.duration_s, (key, call.error_type), failed)
            if call.time_to_first_chunk_s is not None:
                self.first_chunk.record(call.time_to_first_chunk_s, (key, call.error_type), failed)
        provider = (METRICS.provider, call.provider)
        self.latency.record(call.duration_s, provider, {METRICS.provider: call.provider})
        task_type = (METRICS.task_type, call.task_type)
        self.requests.add(1, (provider, task_type, (METRICS.status, call.status)))
        if call.usage is not None:
            self._tokens(call, call.usage, key)
        if call.cost_usd:
            self.spend.add(call.cost_usd, (provider, task_type))

    def _tokens(self, call: CallOutcome, usage: Usage, key: tuple[object, ...]) -> None:
        """The GenAI token histogram takes the provider's counts only ("if usage cannot be
        obtained, the metric MUST NOT be reported" unless offline counting is asked for);
        vapora's token counter takes what was billed, estimates included, as the ledger does."""
        for kind, count in ((TOKEN_INPUT, usage.input_tokens), (TOKEN_OUTPUT, usage.output_tokens)):
            if not call.usage_estimated:
                attributes = {**call.genai, self.names.token_type: kind}
                self.token_usage.record(count, (key, kind), attributes)
            if count:
                self.tokens.add(count, ((METRICS.provider, call.provider), (METRICS.type, kind)))

    def record_decision(self, selected: str, task_type: str, reason: str) -> None:
        self.decisions.add(
            1,
            (
                (METRICS.selected_provider, selected),
                (METRICS.task_type, task_type),
                (METRICS.reason, reason),
            ),
        )

    def record_fallback(self, from_provider: str, to_provider: str, reason: str) -> None:
        self.fallbacks.add(
            1,
            (
                (METRICS.from_provider, from_provider),
                (METRICS.to_provider, to_provider),
                (METRICS.reason, reason),
            ),
        )

    def record_enforcement(self, tier: str, action: str) -> None:
        self.enforcement.add(1, ((METRICS.tier_label, tier), (METRICS.action, action)))

    def record_tier(self, tier: str) -> None:
        self.tier.set(TIER_VALUES.get(tier, -1))
