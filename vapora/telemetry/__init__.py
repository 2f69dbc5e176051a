"""Observability: traces, metrics and structured logs over OpenTelemetry (docs/observability.md).

* :mod:`vapora.telemetry.semconv` holds every emitted name (GenAI conventions v1.41, messaging
  conventions, the guide's metric names);
* :mod:`vapora.telemetry.state` says what is switched on; instrumented code asks it first, so
  telemetry off costs an attribute read;
* :mod:`vapora.telemetry.genai` is the provider call's span and metrics;
* :mod:`vapora.telemetry.sdk` builds the SDK from ``[telemetry]`` and the ``OTEL_*``
  environment variables: exporters (console, JSON lines, OTLP), the Prometheus ``/metrics``
  endpoint (:mod:`vapora.telemetry.prometheus`), the sampler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vapora.telemetry.logs import TASK_ID
from vapora.telemetry.state import STATE

if TYPE_CHECKING:
    from vapora.telemetry.sdk import Telemetry, setup

__all__ = ["STATE", "TASK_ID", "Telemetry", "active", "setup"]


def active() -> bool:
    """Whether any telemetry (traces or metrics) is being recorded in this process."""
    return STATE.tracing or STATE.metrics is not None


def __getattr__(name: str) -> Any:
    # The SDK is imported only by processes that switch telemetry on.
    if name in ("setup", "Telemetry"):
        from vapora.telemetry import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'vapora.telemetry' has no attribute {name!r}")
