"""SDK histograms recorded without the SDK's per-measurement bookkeeping, into the SDK's own
aggregations.

``Histogram.record`` in the OpenTelemetry SDK spends about 12 µs per measurement before it
reaches the bucket counts: a frozen ``Measurement`` whose attributes are cleaned value by value,
the exemplar filter, and, for each reader's view of the instrument, a copy of the attributes
hashed into a sorted tuple to find the aggregation. A provider call records four histogram
measurements, each with one of a handful of attribute sets.

:class:`Histogram` records an attribute set's first measurement through the SDK (which cleans
the attributes and creates the aggregations, one per reader), remembers those aggregation
objects under vapora's own key for the set, and hands later measurements straight to their
``aggregate``: the same bucket counts, sum, min and max, the same exemplar offers, the same
points at collection. Before each fast record it checks that the SDK still holds the same
aggregations (a reader added or removed, a delta collection that starts new ones); if not, or
for a measurement the SDK would refuse (negative, not finite), or when the meter is disabled,
the SDK's own ``record`` takes it. Readers that start new aggregations at every collection
(delta temporality), and attribute sets past the SDK's cardinality limit, are always recorded
through the SDK (and not looked at again until the readers change). If the SDK's internals are
not the ones this was written against (``opentelemetry-sdk`` 1.45), every measurement goes through
the SDK. The tests record the same measurements both ways and compare what the readers
collect.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from time import time_ns
from typing import Any

from opentelemetry.context import get_current
from opentelemetry.metrics import Histogram as ApiHistogram
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

__all__ = ["Histogram"]

log = logging.getLogger("vapora.telemetry")


class _Point:
    """What an aggregation reads of a measurement (``aggregate`` and the exemplar offer)."""

    __slots__ = ("attributes", "context", "instrument", "time_unix_nano", "value")

    def __init__(self, value: float, attributes: Any, instrument: Any, context: Any) -> None:
        self.value = value
        self.time_unix_nano = time_ns()
        self.attributes = attributes
        self.instrument = instrument
        self.context = context


class _Bound:
    """One attribute set's aggregations in every reader, and what must not have changed."""

    __slots__ = ("aggregations", "attributes", "storages", "targets")

    def __init__(
        self, storages: object, targets: list[tuple[Any, Hashable, Any]], attributes: Any
    ) -> None:
        self.storages = storages
        self.targets = targets  # (view-instrument match, hashed attributes, aggregation)
        self.aggregations = [aggregation for _, _, aggregation in targets]
        self.attributes = attributes  # as the SDK cleaned them

    def current(self, consumer: Any) -> bool:
        if consumer._reader_storages is not self.storages:
            return False
        for match, hashed, aggregation in self.targets:
            if match._attributes_aggregation.get(hashed) is not aggregation:
                return False
        return True


class Histogram:
    """An SDK histogram with the fast path described in the module doc."""

    def __init__(self, histogram: ApiHistogram) -> None:
        self.sdk = histogram
        self._bound: dict[Hashable, _Bound] = {}
        # Attribute sets that could not be bound, with the readers they were tried with: not
        # tried again until the readers change (a delta reader, a set over the cardinality
        # limit would otherwise pay for the SDK's record and a second look every time).
        self._unbindable: dict[Hashable, object] = {}
        self._consumer: Any = None
        self._filter: Any = None
        self._enabled: Any = lambda: True
        try:
            from opentelemetry.sdk.metrics._internal._view_instrument_match import (
                _hash_attributes,
            )
            from opentelemetry.sdk.metrics._internal.measurement import Measurement

            consumer = histogram._measurement_consumer  # type: ignore[attr-defined]
            consumer._reader_storages.values()
            self._filter = consumer._sdk_config.exemplar_filter
            self._enabled = histogram._is_enabled  # type: ignore[attr-defined]
            self._consumer = consumer
            self._hash: Any = _hash_attributes
            self._measurement: Any = Measurement
        except (AttributeError, ImportError):
            log.debug("telemetry: the SDK's histogram internals moved; recording through it")

    def record(self, value: float, key: Hashable, attributes: Mapping[str, Any]) -> None:
        """Record ``value`` with ``attributes``; ``key``: a hashable name for that attribute set
        (the same key must always mean the same attributes)."""
        bound = self._bound.get(key)
        consumer = self._consumer
        if (
            bound is not None
            and consumer is not None
            and value >= 0
            and value != math.inf
            and bound.current(consumer)
            and self._enabled()
        ):
            exemplars = self._filter
            if isinstance(exemplars, AlwaysOffExemplarFilter):
                point = _Point(value, bound.attributes, self.sdk, None)
                for aggregation in bound.aggregations:
                    aggregation.aggregate(point, False)
                return
            point = _Point(value, bound.attributes, self.sdk, get_current())
            sample = exemplars.should_sample(
                value, point.time_unix_nano, point.attributes, point.context
            )
            for aggregation in bound.aggregations:
                aggregation.aggregate(point, sample)
            return
        self.sdk.record(value, attributes)
        if consumer is None or (bound is not None and bound.current(consumer)):
            return
        storages = consumer._reader_storages
        if self._unbindable.get(key) is storages:
            return  # tried with these readers already (delta, over the cardinality limit)
        self._bind(key, attributes)
        unbound = key not in self._bound and self._consumer is not None
        if unbound and len(self._unbindable) < 4096:
            self._unbindable[key] = storages

    def _bind(self, key: Hashable, attributes: Mapping[str, Any]) -> None:
        """Find the aggregations the SDK made for ``attributes`` in every reader."""
        self._bound.pop(key, None)
        consumer = self._consumer
        storages = consumer._reader_storages
        # The SDK cleans the attributes in Measurement; the hashed form finds the aggregation.
        cleaned = self._measurement(0, 0, self.sdk, get_current(), attributes).attributes or {}
        targets: list[tuple[Any, Hashable, Any]] = []
        try:
            for storage in storages.values():
                matches = storage._instrument_view_instrument_matches.get(self.sdk)
                if not matches:
                    return
                for match in matches:
                    if match._reset_on_collect:  # delta: new aggregations every collection
                        return
                    keys = match._view._attribute_keys
                    chosen = (
                        cleaned if keys is None else {k: v for k, v in cleaned.items() if k in keys}
                    )
                    hashed = self._hash(dict(chosen))
                    aggregation = match._attributes_aggregation.get(hashed)
                    if aggregation is None:  # over the cardinality limit, or dropped
                        return
                    targets.append((match, hashed, aggregation))
        except (AttributeError, TypeError):
            # Internals moved: the SDK records everything from now on (what was bound too).
            self._consumer = None
            self._bound.clear()
            log.debug("telemetry: the SDK's histogram internals moved; recording through it")
            return
        self._bound[key] = _Bound(storages, targets, cleaned)
