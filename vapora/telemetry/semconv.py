"""Every name vapora emits to OpenTelemetry: span names, attributes, metrics, units and buckets.

The GenAI names are those of the OpenTelemetry semantic conventions **v1.41.0** (the last GenAI
release from the main repository, Development status); the messaging names those of the messaging
conventions. The GenAI conventions have since moved to ``semantic-conventions-genai`` and are
renaming things (``gen_ai.client.inference.duration``, ``cache_write``); when that set is
released, moving to it is an edit of this module alone, selected by
``OTEL_SEMCONV_STABILITY_OPT_IN`` (see :func:`genai_names`). Nothing else in vapora spells an
attribute or metric name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DURATION_BUCKETS",
    "GUIDE_LATENCY_BUCKETS",
    "GenAINames",
    "MESSAGING",
    "METRICS",
    "OPERATION_BY_KIND",
    "PROVIDER_BY_KIND",
    "TOKEN_BUCKETS",
    "V1_41",
    "VAPORA",
    "genai_names",
]

SEMCONV_OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
LATEST_EXPERIMENTAL = "gen_ai_latest_experimental"


@dataclass(frozen=True)
class GenAINames:
    """One version of the GenAI conventions' names (span attributes and client metrics)."""

    version: str
    operation_name: str = "gen_ai.operation.name"
    provider_name: str = "gen_ai.provider.name"
    request_model: str = "gen_ai.request.model"
    request_max_tokens: str = "gen_ai.request.max_tokens"
    request_temperature: str = "gen_ai.request.temperature"
    request_stream: str = "gen_ai.request.stream"
    response_id: str = "gen_ai.response.id"
    response_model: str = "gen_ai.response.model"
    response_finish_reasons: str = "gen_ai.response.finish_reasons"
    response_time_to_first_chunk: str = "gen_ai.response.time_to_first_chunk"
    usage_input_tokens: str = "gen_ai.usage.input_tokens"
    usage_output_tokens: str = "gen_ai.usage.output_tokens"
    usage_cache_read_input_tokens: str = "gen_ai.usage.cache_read.input_tokens"
    usage_cache_creation_input_tokens: str = "gen_ai.usage.cache_creation.input_tokens"
    usage_reasoning_output_tokens: str = "gen_ai.usage.reasoning.output_tokens"
    input_messages: str = "gen_ai.input.messages"
    output_messages: str = "gen_ai.output.messages"
    system_instructions: str = "gen_ai.system_instructions"
    token_type: str = "gen_ai.token.type"
    server_address: str = "server.address"
    server_port: str = "server.port"
    error_type: str = "error.type"
    # metrics
    token_usage: str = "gen_ai.client.token.usage"
    operation_duration: str = "gen_ai.client.operation.duration"
    time_to_first_chunk: str = "gen_ai.client.operation.time_to_first_chunk"


V1_41 = GenAINames(version="1.41.0")


def genai_names(env: Mapping[str, str]) -> GenAINames:
    """The GenAI names to emit. ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``
    asks for the newest *released* experimental set, which today is v1.41.0, the default too:
    vapora never emitted an older one. (When the post-move set is released, give it a
    ``GenAINames`` here and return it for that opt-in.)"""
    del env  # both answers are v1.41.0 today; the opt-in is read here and only here
    return V1_41


# --- values -------------------------------------------------------------------------------------

#: ``gen_ai.provider.name`` per vapora provider kind (Ollama has no well-known value).
PROVIDER_BY_KIND: Mapping[str, str] = {
    "anthropic": "anthropic",
    "openai": "openai",
    "gemini": "gcp.gemini",
    "ollama": "ollama",
}

#: ``gen_ai.operation.name`` per provider kind; Ollama's prompt endpoint is a text completion.
OPERATION_BY_KIND: Mapping[str, str] = {
    "anthropic": "chat",
    "openai": "chat",
    "gemini": "generate_content",
    "ollama": "chat",
}
OLLAMA_GENERATE_OPERATION = "text_completion"

TOKEN_INPUT = "input"
TOKEN_OUTPUT = "output"
ERROR_OTHER = "_OTHER"

#: ``gen_ai.client.token.usage`` buckets (ExplicitBucketBoundaries of the spec).
TOKEN_BUCKETS: tuple[float, ...] = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
#: ``gen_ai.client.operation.duration`` and ``time_to_first_chunk`` buckets (seconds).
DURATION_BUCKETS: tuple[float, ...] = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
#: The guide's latency histogram uses the Prometheus client's default buckets.
GUIDE_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class _Messaging:
    system_value: str = "nats"
    system: str = "messaging.system"
    operation_type: str = "messaging.operation.type"
    operation_name: str = "messaging.operation.name"
    destination: str = "messaging.destination.name"
    consumer_group: str = "messaging.consumer.group.name"
    message_id: str = "messaging.message.id"
    body_size: str = "messaging.message.body.size"
    batch_count: str = "messaging.batch.message_count"
    send: str = "send"
    publish: str = "publish"
    process: str = "process"


MESSAGING = _Messaging()


@dataclass(frozen=True)
class _Vapora:
    """vapora's own attributes (its namespace, as the conventions ask for custom ones)."""

    task_id: str = "vapora.task.id"
    task_type: str = "vapora.task.type"
    cost_usd: str = "vapora.cost_usd"
    attempt: str = "vapora.attempt"
    route_reason: str = "vapora.route.reason"
    route_chain: str = "vapora.route.chain"
    provider: str = "vapora.provider"
    error_class: str = "vapora.error.class"
    tier: str = "vapora.budget.tier"
    event_type: str = "vapora.event.type"
    event_seq: str = "vapora.event.seq"
    #: A batch's events (one span for several appended or processed together): their ids and
    #: types, in order (``messaging.message.id`` names a single message only).
    event_ids: str = "vapora.event.ids"
    event_types: str = "vapora.event.types"
    replay: str = "vapora.replay"
    usage_estimated: str = "vapora.usage.estimated"


VAPORA = _Vapora()


@dataclass(frozen=True)
class _Metrics:
    """The guide's six metrics (names and labels as in its ``metrics.rs``), plus spend and tier."""

    requests: str = "vapora_llm_provider_requests_total"
    latency: str = "vapora_llm_provider_latency_seconds"
    tokens: str = "vapora_llm_provider_tokens_total"
    routing_decisions: str = "vapora_llm_routing_decisions_total"
    fallback_triggers: str = "vapora_llm_fallback_triggers_total"
    budget_enforcement: str = "vapora_llm_budget_enforcement_total"
    spend: str = "vapora_llm_spend_usd_total"
    tier: str = "vapora_budget_tier"
    budget_spent: str = "vapora_budget_spent_usd"
    # labels
    provider: str = "provider"
    task_type: str = "task_type"
    status: str = "status"
    type: str = "type"
    selected_provider: str = "selected_provider"
    reason: str = "reason"
    from_provider: str = "from_provider"
    to_provider: str = "to_provider"
    tier_label: str = "tier"
    action: str = "action"
    period: str = "period"


METRICS = _Metrics()

#: The gauge's value per tier (a label would make three series of which two are always 0).
TIER_VALUES: Mapping[str, int] = {"Normal": 0, "NearThreshold": 1, "Exceeded": 2}
