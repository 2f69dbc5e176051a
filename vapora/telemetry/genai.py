"""The GenAI inference span and metrics of one provider call (conventions v1.41, see semconv).

::

    spec = CallSpec.of(client, request, task_id=..., task_type=..., attempt=2, stream=True)
    with ProviderCallTelemetry(spec) as call:
        done = await client.complete(request)
        call.succeeded(done)           # response attributes, usage, cost, metrics
    # a ProviderError leaving the block sets error.type, the span's error status and the metrics

The span is named ``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT; the attributes
the conventions want at start (operation, provider, request model, server address and port) are
given at start, so samplers see them. ``gen_ai.usage.input_tokens`` is vapora's
``Usage.input_tokens``, which already includes cache reads and writes (the conventions' rule;
Anthropic's own ``input_tokens`` excludes them and the Anthropic client adds them). Prompt and
completion text go on the span only when ``capture_content`` is on, as the opt-in
``gen_ai.input.messages`` / ``gen_ai.output.messages`` / ``gen_ai.system_instructions``.
"""

from __future__ import annotations

import functools
import time
from contextvars import Token
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgspec
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from events.codec import plain_decimal
from events.contract import Price, Usage
from vapora.errors import ProviderError
from vapora.pricing import cost
from vapora.providers import Completion, ProviderClient, ProviderRequest, StreamBroken
from vapora.telemetry.context import attach_span, current_span, detach, sampled_out
from vapora.telemetry.instruments import CallOutcome
from vapora.telemetry.semconv import (
    ERROR_OTHER,
    OLLAMA_GENERATE_OPERATION,
    OPERATION_BY_KIND,
    PROVIDER_BY_KIND,
    VAPORA,
    GenAINames,
)
from vapora.telemetry.state import STATE

__all__ = ["CallSpec", "ProviderCallTelemetry", "error_type", "operation_of", "server_of"]

_DEFAULT_PORTS = {"https": 443, "http": 80}
_CANCELLED = "cancelled"  # error.type and error class of a cancelled call (the event log's)
#: error.type of a stream its caller stopped reading (vapora.providers.stream.CALLER_CANCELLED).
_BY_CALLER = "cancelled_by_caller"


def operation_of(kind: str, request: ProviderRequest) -> str:
    """``gen_ai.operation.name`` of a call: Ollama's ``/api/generate`` is a text completion."""
    if kind == "ollama" and request.messages is None:
        return OLLAMA_GENERATE_OPERATION
    return OPERATION_BY_KIND.get(kind, "chat")


@functools.lru_cache(maxsize=64)
def server_of(base_url: str) -> tuple[str, int]:
    """``(server.address, server.port)`` of a base URL (the port defaulted by the scheme)."""
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


def error_type(error: BaseException) -> str:
    """The low-cardinality ``error.type``: the provider's error code, else its HTTP status,
    else vapora's error class (``timeout``, ``transient`` ...), else ``_OTHER``."""
    if isinstance(error, ProviderError):
        if error.error_type:
            return error.error_type
        if error.http_status is not None:
            return str(error.http_status)
        return error.error_class
    return ERROR_OTHER


@dataclass(kw_only=True, slots=True)
class CallSpec:
    """What is known about a provider call before it starts (made once per call: a plain
    slotted class, as a frozen dataclass's ``__init__`` costs a call per field)."""

    provider: str  # vapora's name for it (the config's), e.g. "claude"
    kind: str  # anthropic | openai | gemini | ollama
    model: str
    server_address: str
    server_port: int
    request: ProviderRequest
    stream: bool
    task_id: str
    task_type: str
    attempt: int
    price: Price
    route_reason: str | None = None

    @classmethod
    def of(
        cls,
        client: ProviderClient,
        request: ProviderRequest,
        *,
        task_id: str,
        task_type: str,
        attempt: int,
        stream: bool,
        route_reason: str | None = None,
    ) -> CallSpec:
        address, port = server_of(client.base_url)
        return cls(
            provider=client.name,
            kind=client.kind,
            model=request.model or client.model,
            server_address=address,
            server_port=port,
            request=request,
            stream=stream,
            task_id=task_id,
            task_type=task_type,
            attempt=attempt,
            price=request.price or client.price,
            route_reason=route_reason,
        )

    @property
    def operation(self) -> str:
        return operation_of(self.kind, self.request)

    def metric_attributes(self, names: GenAINames) -> dict[str, str | int]:
        """The GenAI metric attributes: one dict per provider, model, operation and server,
        shared (read it, copy it to change it)."""
        key = (
            names,
            self.operation,
            self.kind,
            self.model,
            self.server_address,
            self.server_port,
        )
        attributes = _METRIC_ATTRIBUTES.get(key)
        if attributes is None:
            attributes = {
                names.operation_name: self.operation,
                names.provider_name: PROVIDER_BY_KIND.get(self.kind, self.kind),
                names.request_model: self.model,
                names.server_address: self.server_address,
                names.server_port: self.server_port,
            }
            if len(_METRIC_ATTRIBUTES) < 1024:
                _METRIC_ATTRIBUTES[key] = attributes
        return attributes

    def start_attributes(self, names: GenAINames) -> dict[str, Any]:
        attributes: dict[str, Any] = dict(self.metric_attributes(names))
        attributes[names.request_max_tokens] = self.request.output_limit
        if self.request.temperature is not None:
            attributes[names.request_temperature] = self.request.temperature
        if self.stream:
            attributes[names.request_stream] = True
        attributes[VAPORA.task_id] = self.task_id
        attributes[VAPORA.task_type] = self.task_type
        attributes[VAPORA.attempt] = self.attempt
        attributes[VAPORA.provider] = self.provider
        if self.route_reason:
            attributes[VAPORA.route_reason] = self.route_reason
        return attributes


_METRIC_ATTRIBUTES: dict[tuple[Any, ...], dict[str, str | int]] = {}


def response_attributes(done: Completion, names: GenAINames) -> dict[str, Any]:
    """Response id, model, finish reasons, usage (cache semantics of the conventions), cost."""
    usage = done.usage
    attributes: dict[str, Any] = {
        names.response_model: done.model,
        names.usage_input_tokens: usage.input_tokens,
        names.usage_output_tokens: usage.output_tokens,
        names.usage_cache_read_input_tokens: usage.cache_read_tokens,
        names.usage_cache_creation_input_tokens: usage.cache_write_tokens,
        VAPORA.cost_usd: plain_decimal(done.cost_usd),
    }
    if done.response_id:
        attributes[names.response_id] = done.response_id
    if done.finish_reason:
        attributes[names.response_finish_reasons] = (done.finish_reason,)
    if done.usage_estimated:
        attributes[VAPORA.usage_estimated] = True
    if done.reasoning_tokens is not None:
        attributes[names.usage_reasoning_output_tokens] = done.reasoning_tokens
    return attributes


def _has_tokens(usage: Usage) -> bool:
    return bool(usage.input_tokens or usage.output_tokens)


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "content": text}


def content_attributes(spec: CallSpec, names: GenAINames) -> dict[str, str]:
    """The opt-in input messages and system instructions, JSON per the conventions' schema."""
    request = spec.request
    turns = [{"role": role, "parts": [_text_part(text)]} for role, text in request.turns()]
    attributes = {names.input_messages: msgspec.json.encode(turns).decode()}
    if request.system:
        attributes[names.system_instructions] = msgspec.json.encode(
            [_text_part(request.system)]
        ).decode()
    return attributes


def output_attributes(done: Completion, names: GenAINames) -> dict[str, str]:
    message = {
        "role": "assistant",
        "parts": [_text_part(done.text)],
        "finish_reason": done.finish_reason or "",
    }
    return {names.output_messages: msgspec.json.encode([message]).decode()}


class ProviderCallTelemetry:
    """The span and metrics of one provider call (see the module doc).

    Use it only when :data:`STATE` has tracing or metrics on; it does both, each if switched on.
    """

    def __init__(self, spec: CallSpec) -> None:
        self.spec = spec
        self.names = STATE.names
        self.span: Span | None = None
        self._token: Token[otel_context.Context] | None = None
        self._started = 0.0
        self._done: Completion | None = None

    def __enter__(self) -> ProviderCallTelemetry:
        if STATE.tracing:
            current = current_span()
            parent = current.get_span_context()
            if not sampled_out(parent):
                spec, names = self.spec, self.names
                attributes = spec.start_attributes(names)
                if STATE.capture_content:
                    attributes.update(content_attributes(spec, names))
                self.span = STATE.start_span(
                    f"{spec.operation} {spec.model}", SpanKind.CLIENT, attributes, parent, ()
                )
                # Current while the call runs: stream chunks carry the call's context.
                self._token = attach_span(self.span)
        self._started = time.perf_counter()
        return self

    def succeeded(self, done: Completion) -> None:
        """Record the completion (call inside the ``with`` block)."""
        self._done = done

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._started
        try:
            if isinstance(exc, Exception):
                self._failed(exc, elapsed)
            elif exc is not None:  # cancelled (a shutdown, the caller gone): not a provider error
                self._cancelled(elapsed)
            elif self._done is not None:
                self._succeeded(self._done, elapsed)
        finally:
            if self._token is not None:
                detach(self._token)
            if self.span is not None:
                self.span.end()

    def _succeeded(self, done: Completion, elapsed: float) -> None:
        names = self.names
        first = done.first_token_ms / 1000 if done.first_token_ms is not None else None
        if self.span is not None:
            attributes = response_attributes(done, names)
            if self.spec.stream and first is not None:
                attributes[names.response_time_to_first_chunk] = first
            if STATE.capture_content:
                attributes.update(output_attributes(done, names))
            self.span.set_attributes(attributes)
        if STATE.metrics is not None:
            genai = {
                **self.spec.metric_attributes(names),
                names.response_model: done.model,
            }
            STATE.metrics.record_call(
                CallOutcome(
                    genai=genai,
                    provider=self.spec.provider,
                    task_type=self.spec.task_type,
                    status="ok",
                    duration_s=elapsed,
                    time_to_first_chunk_s=first if self.spec.stream else None,
                    usage=done.usage,
                    cost_usd=done.cost_usd,
                    usage_estimated=done.usage_estimated,
                )
            )

    def _failed(self, exc: BaseException, elapsed: float) -> None:
        """A failed call: ``error.type``, the error class and what was billed regardless (its
        tokens and cost, as the ``call_failed`` and ``spend_recorded`` events have them), and
        for a stream that broke after its first chunk the time to that chunk."""
        names = self.names
        kind = error_type(exc)
        error_class = exc.error_class if isinstance(exc, ProviderError) else "internal"
        if kind == _BY_CALLER:
            # The caller stopped reading: not the provider's failure (the event's class is
            # stream_broken, its code cancelled_by_caller), counted as a cancel.
            error_class = _CANCELLED
        usage = exc.usage if isinstance(exc, ProviderError) else None
        billed = usage if usage is not None and _has_tokens(usage) else None
        price = (exc.price if isinstance(exc, ProviderError) else None) or self.spec.price
        billed_usd = cost(billed, price) if billed else Decimal(0)
        first_ms = exc.first_token_ms if isinstance(exc, StreamBroken) else None
        first = first_ms / 1000 if first_ms is not None and self.spec.stream else None
        if self.span is not None:
            attributes: dict[str, Any] = {names.error_type: kind, VAPORA.error_class: error_class}
            if billed is not None:
                attributes[names.usage_input_tokens] = billed.input_tokens
                attributes[names.usage_output_tokens] = billed.output_tokens
                attributes[names.usage_cache_read_input_tokens] = billed.cache_read_tokens
                attributes[names.usage_cache_creation_input_tokens] = billed.cache_write_tokens
                attributes[VAPORA.cost_usd] = plain_decimal(billed_usd)
                if getattr(exc, "usage_estimated", False):
                    attributes[VAPORA.usage_estimated] = True
            if first is not None:
                attributes[names.response_time_to_first_chunk] = first
            self.span.set_attributes(attributes)
            # The message is the provider's, scrubbed of keys by the clients; never a prompt.
            self.span.set_status(Status(StatusCode.ERROR, kind))
        if STATE.metrics is not None:
            STATE.metrics.record_call(
                CallOutcome(
                    genai=self.spec.metric_attributes(names),
                    provider=self.spec.provider,
                    task_type=self.spec.task_type,
                    status=error_class,
                    duration_s=elapsed,
                    time_to_first_chunk_s=first,
                    usage=billed,
                    cost_usd=billed_usd,
                    error_type=kind,
                    usage_estimated=getattr(exc, "usage_estimated", False),
                )
            )

    def _cancelled(self, elapsed: float) -> None:
        """A call cancelled while the provider had it (a stop, a drain past its limit): the
        provider actor records it as a ``call_failed`` of class ``cancelled`` with nothing
        billed, so the span fails and the request is counted with that status."""
        if self.span is not None:
            self.span.set_attribute(self.names.error_type, _CANCELLED)
            self.span.set_attribute(VAPORA.error_class, _CANCELLED)
            self.span.set_status(Status(StatusCode.ERROR, _CANCELLED))
        if STATE.metrics is not None:
            STATE.metrics.record_call(
                CallOutcome(
                    genai=self.spec.metric_attributes(self.names),
                    provider=self.spec.provider,
                    task_type=self.spec.task_type,
                    status=_CANCELLED,
                    duration_s=elapsed,
                    error_type=_CANCELLED,
                )
            )
