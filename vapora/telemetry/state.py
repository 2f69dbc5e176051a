"""What telemetry is switched on in this process: the tracer, the metric instruments, the names.

Instrumented code asks :data:`STATE` before doing any telemetry work, so that with telemetry
off the hot path pays one attribute read (``STATE.tracing`` / ``STATE.metrics``) and nothing
else: no span objects, no header injection, no attribute dictionaries.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Tracer, TracerProvider

from vapora.telemetry.instruments import Instruments
from vapora.telemetry.semconv import V1_41, GenAINames

__all__ = ["STATE", "TelemetryState", "use_meter_provider", "use_tracer_provider"]

SCOPE = "vapora"


@dataclass
class TelemetryState:
    """The switches; mutated only by :func:`use_tracer_provider` / :func:`use_meter_provider`."""

    tracer: Tracer = field(default_factory=lambda: trace.get_tracer(SCOPE))
    tracing: bool = False
    metrics: Instruments | None = None
    capture_content: bool = False
    names: GenAINames = V1_41


STATE = TelemetryState()


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``), or stop tracing with ``None``."""
    STATE.tracer = (provider or trace.get_tracer_provider()).get_tracer(SCOPE)
    STATE.tracing = provider is not None


_instruments: weakref.WeakKeyDictionary[MeterProvider, Instruments] = weakref.WeakKeyDictionary()


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record metrics through ``provider``, or stop recording with ``None``."""
    if provider is None:
        STATE.metrics = None
        return
    # Instruments are made once per provider (and names), then reused when switched back to.
    instruments = _instruments.get(provider)
    if instruments is None or instruments.names is not STATE.names:
        instruments = _instruments[provider] = Instruments(provider.get_meter(SCOPE), STATE.names)
    STATE.metrics = instruments


def use_options(*, capture_content: bool, names: GenAINames) -> None:
    """Whether prompt and completion text go on spans (opt-in), and which names to emit."""
    STATE.capture_content = capture_content
    STATE.names = names
