"""The current span, read and set the way OpenTelemetry's API does, in one step each.

``trace.get_current_span()`` goes through ``get_value``, ``get_current``, the runtime context
object and an ``isinstance`` check against the ``Span`` ABC; ``context.attach(
trace.set_span_in_context(span))`` copies the context through ``set_value``. vapora does these
about twenty times per task. With the API's default runtime context (a ``ContextVar`` holding
an immutable ``Context`` dict), these functions read and set that variable directly: the same
values, visible to any OpenTelemetry instrumentation in the process. With another runtime
context (``OTEL_PYTHON_CONTEXT``) they call the API.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanContext
from opentelemetry.trace.propagation import _SPAN_KEY

__all__ = ["attach_span", "current_context", "current_span", "detach", "sampled_out"]


def sampled_out(span_context: SpanContext) -> bool:
    """Whether ``span_context`` is a valid one whose trace was sampled out: no spans are made
    under it, only the context travels on. (A ``SpanContext`` is a tuple whose properties read
    its items: 5 is ``is_valid``, 3 the trace flags; read directly, as on every message.)"""
    return bool(span_context[5] and not span_context[3] & 1)


def _variable() -> ContextVar[Context] | None:
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    except ImportError:  # pragma: no cover - the API has shipped it since 1.0
        return None
    runtime: Any = getattr(api, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    variable = getattr(runtime, "_current_context", None)
    return variable if isinstance(variable, ContextVar) else None


_CURRENT = _variable()


if _CURRENT is not None:
    _get = _CURRENT.get
    _set = _CURRENT.set
    _reset = _CURRENT.reset

    #: ``context.get_current()``: the variable's own ``get``.
    current_context: Callable[[], Context] = _get

    _SPAN_TYPES: set[type] = set()  # classes seen to be Spans (an ABC check is slow)

    def current_span(context: Context | None = None) -> Span:
        """``trace.get_current_span(context)``."""
        span = (context if context is not None else _get()).get(_SPAN_KEY)
        if span is None:
            return INVALID_SPAN
        if type(span) in _SPAN_TYPES:
            return span  # type: ignore[return-value]
        if isinstance(span, Span):
            _SPAN_TYPES.add(type(span))
            return span
        return INVALID_SPAN

    def attach_span(span: Span, base: Context | None = None) -> Token[Context]:
        """``context.attach(trace.set_span_in_context(span, base))``."""
        values = Context(base if base is not None else _get())  # one copy
        dict.__setitem__(values, _SPAN_KEY, span)  # a Context refuses item assignment
        return _set(values)

    def detach(token: Token[Context]) -> None:
        """``context.detach(token)``."""
        try:
            _reset(token)
        except Exception:  # another context's token, or one used twice: the API logs it
            api.detach(token)

else:  # another runtime context: through the API
    current_context = api.get_current

    def current_span(context: Context | None = None) -> Span:
        return trace.get_current_span(context)

    def attach_span(span: Span, base: Context | None = None) -> Token[Context]:
        return api.attach(trace.set_span_in_context(span, base))

    def detach(token: Token[Context]) -> None:
        api.detach(token)
