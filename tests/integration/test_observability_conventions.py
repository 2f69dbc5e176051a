"""The provider call's span and the client metrics against the OpenTelemetry GenAI conventions
v1.41.0, for every provider kind, streaming and not; content only when opted in; no API key or
prompt anywhere (issue 6). Real nats-server and the simulator over HTTP.

The tables below are copied from the spec (``docs/gen-ai/gen-ai-spans.md`` and
``gen-ai-metrics.md`` at v1.41.0, summarised in ``shared/reference/nats-otel.md`` §1.2-1.3), not
from vapora's semconv module, so that a wrong name there fails here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.fault.provider_harness import KEYS, config_text, deployment
from vapora.config import TelemetryConfig
from vapora.errors import VaporaError
from vapora.telemetry import setup

pytestmark = pytest.mark.anyio

# --- the spec ---------------------------------------------------------------------------------

#: gen_ai.provider.name and gen_ai.operation.name per provider (§1.2); Ollama's prompt endpoint
#: /api/generate is a text completion, its /api/chat a chat.
SPEC_PROVIDER = {
    "claude": ("anthropic", "chat"),
    "openai": ("openai", "chat"),
    "gemini": ("gcp.gemini", "generate_content"),
    "ollama": ("ollama", "text_completion"),
}
#: "Set at span start (they matter for sampling)".
SPEC_AT_START = {
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "server.address",
    "server.port",
}
SPEC_RECOMMENDED_RESPONSE = {
    "gen_ai.response.model",
    "gen_ai.response.finish_reasons",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.request.max_tokens",
}
SPEC_OPT_IN = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}

TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]  # fmt: skip
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    buckets: list[float]
    required: set[str]
    conditional: set[str]
    recommended: set[str]


_COMMON = {"gen_ai.operation.name", "gen_ai.provider.name"}
SPEC_METRICS = {
    "gen_ai.client.token.usage": MetricSpec(
        "{token}",
        TOKEN_BUCKETS,
        _COMMON | {"gen_ai.token.type"},
        {"gen_ai.request.model", "server.port"},
        {"gen_ai.response.model", "server.address"},
    ),
    "gen_ai.client.operation.duration": MetricSpec(
        "s",
        DURATION_BUCKETS,
        _COMMON,
        {"gen_ai.request.model", "server.port", "error.type"},
        {"gen_ai.response.model", "server.address"},
    ),
    "gen_ai.client.operation.time_to_first_chunk": MetricSpec(
        "s",
        DURATION_BUCKETS,
        _COMMON,
        {"gen_ai.request.model", "server.port"},
        {"gen_ai.response.model", "server.address"},
    ),
}

# --- fixtures ---------------------------------------------------------------------------------

MODELS = {
    "claude": "claude-opus-4-5-cached-10-cachew-5",
    "openai": "gpt-4-cached-8",
    "gemini": "gemini-2.0-flash-cached-6",
    "ollama": "llama2",
}
PROMPT = "Tell me about the secret-plum-7 owl"


class AtStart(SpanProcessor):
    """Records each span's attributes as they were when it started."""

    def __init__(self) -> None:
        self.started: dict[int, dict[str, Any]] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started[span.context.span_id] = dict(span.attributes or {})

    def on_end(self, span: ReadableSpan) -> None:
        pass


@dataclass
class Recorded:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    at_start: AtStart

    def genai_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.kind is SpanKind.CLIENT]

    def metric(self, name: str) -> Metric | None:
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return metric
        return None


def _recorded(capture: bool) -> Iterator[Recorded]:
    spans, metrics, at_start = InMemorySpanExporter(), InMemoryMetricReader(), AtStart()
    telemetry = setup(
        TelemetryConfig(enabled=True, capture_content=capture),
        env={},
        span_exporters=[spans],
        metric_readers=[metrics],
    )
    assert telemetry.tracer_provider is not None
    telemetry.tracer_provider.add_span_processor(at_start)
    yield Recorded(spans, metrics, at_start)
    telemetry.shutdown()


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    yield from _recorded(capture=False)


@pytest.fixture
def recorded_with_content() -> Iterator[Recorded]:
    yield from _recorded(capture=True)


def config(base_url: str) -> str:
    return config_text(base_url, models=MODELS)


@dataclass(frozen=True)
class Answered:
    """What the calls of :func:`_one_of_each` answered, per provider, and where they went."""

    port: int  # the simulator's: every provider's server.port
    cost: dict[str, Decimal]
    finish_reason: dict[str, str | None]
    max_tokens: dict[str, int]  # the output limit each provider's request carried


def _output_limit(provider: str | None, body: dict[str, Any]) -> int:
    """The output token limit in a provider request's body, in that provider's own field."""
    if provider == "gemini":
        return int(body["generationConfig"]["maxOutputTokens"])
    if provider == "ollama":
        return int(body["options"]["num_predict"])
    if provider == "openai":
        return int(body.get("max_completion_tokens") or body["max_tokens"])
    return int(body["max_tokens"])  # anthropic


async def _one_of_each(tmp_path: Path, stream: bool, *, system: str | None = None) -> Answered:
    cost: dict[str, Decimal] = {}
    finish: dict[str, str | None] = {}
    async with deployment(tmp_path, config) as dep:
        for name in SPEC_PROVIDER:
            if stream:
                async with dep.client.stream(prompt=PROMPT, provider=name, system=system) as s:
                    assert "".join([t async for t in s])
                assert s.result is not None
                cost[name], finish[name] = s.result.cost_usd, s.result.finish_reason
            else:
                result = await dep.client.complete(prompt=PROMPT, provider=name, system=system)
                assert result.text
                cost[name], finish[name] = result.cost_usd, result.finish_reason
        port = urlsplit(dep.sim.base_url).port
        received = dep.sim.requests
    assert port is not None
    limits = {r.provider: _output_limit(r.provider, r.json()) for r in received if r.body}
    kinds = {"claude": "anthropic", "openai": "openai", "gemini": "gemini", "ollama": "ollama"}
    max_tokens = {name: limits[kind] for name, kind in kinds.items()}
    return Answered(port, cost, finish, max_tokens)


# --- the span ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_each_providers_span_follows_the_genai_conventions(
    tmp_path: Path, recorded: Recorded, stream: bool
) -> None:
    answered = await _one_of_each(tmp_path, stream)
    genai_spans = recorded.genai_spans()
    spans = {str(s.attributes["vapora.provider"]): s for s in genai_spans}
    assert set(spans) == set(SPEC_PROVIDER) and len(genai_spans) == len(SPEC_PROVIDER)
    for name, span in spans.items():
        provider_name, operation = SPEC_PROVIDER[name]
        a = span.attributes
        assert span.name == f"{operation} {MODELS[name]}"
        assert span.kind is SpanKind.CLIENT
        assert (a["gen_ai.provider.name"], a["gen_ai.operation.name"]) == (provider_name, operation)
        assert a["gen_ai.request.model"] == MODELS[name]
        assert (a["server.address"], a["server.port"]) == ("127.0.0.1", answered.port)
        assert set(recorded.at_start.started[span.context.span_id]) >= SPEC_AT_START, name
        assert set(a) >= SPEC_RECOMMENDED_RESPONSE, name
        assert a["gen_ai.request.max_tokens"] == answered.max_tokens[name]  # what was sent
        # The reason the answer gave, as the conventions' one-element array.
        assert answered.finish_reason[name]
        assert a["gen_ai.response.finish_reasons"] == (answered.finish_reason[name],)
        if name != "ollama":  # Ollama's API has no response id
            assert a["gen_ai.response.id"]
        # Cache semantics: input_tokens includes cached tokens; the cache counts are subsets.
        cached = {"claude": (10, 5), "openai": (8, 0), "gemini": (6, 0), "ollama": (0, 0)}[name]
        read, written = (
            a["gen_ai.usage.cache_read.input_tokens"],
            a["gen_ai.usage.cache_creation.input_tokens"],
        )
        assert (read, written) == cached, name
        assert a["gen_ai.usage.input_tokens"] > read + written  # the prompt's own tokens too
        assert a["gen_ai.usage.output_tokens"] > 0
        # vapora's own attributes
        assert a["vapora.task.type"] == "GeneralQuery" and a["vapora.task.id"]
        assert a["vapora.attempt"] == 1 and "manual override" in str(a["vapora.route.reason"])
        # The cost the caller was charged, as a decimal string: nothing for the local model.
        assert Decimal(str(a["vapora.cost_usd"])) == answered.cost[name]
        assert (answered.cost[name] == 0) is (name == "ollama"), name
        if stream:
            assert a["gen_ai.request.stream"] is True
            assert 0 <= a["gen_ai.response.time_to_first_chunk"] < 10
        else:
            assert "gen_ai.request.stream" not in a
            assert "gen_ai.response.time_to_first_chunk" not in a
        assert not SPEC_OPT_IN & set(a), "content recorded without the opt-in"
        assert "error.type" not in a


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_reasoning_tokens_a_provider_reports_are_on_the_span(
    tmp_path: Path, recorded: Recorded, stream: bool
) -> None:
    """``gen_ai.usage.reasoning.output_tokens`` (v1.41, "recommended when applicable"): OpenAI's
    ``reasoning_tokens`` and Gemini's ``thoughtsTokenCount``, a subset of the output. Claude
    counts its thinking in the output without a count of its own, Ollama reports none."""
    models = {name: f"{model}-thoughts-7" for name, model in MODELS.items()}
    async with deployment(tmp_path, lambda url: config_text(url, models=models)) as dep:
        for name in SPEC_PROVIDER:
            if stream:
                async with dep.client.stream(prompt=PROMPT, provider=name) as s:
                    assert "".join([t async for t in s])
            else:
                assert (await dep.client.complete(prompt=PROMPT, provider=name)).text
    spans = {str(s.attributes["vapora.provider"]): s.attributes for s in recorded.genai_spans()}
    key = "gen_ai.usage.reasoning.output_tokens"
    for name in ("openai", "gemini"):
        assert spans[name][key] == 7, name
        assert spans[name]["gen_ai.usage.output_tokens"] > 7  # the answer's own tokens too
    assert key not in spans["claude"] and key not in spans["ollama"]


async def test_anthropics_input_tokens_include_its_cache_tokens(
    tmp_path: Path, recorded: Recorded
) -> None:
    """Anthropic's own input_tokens excludes cached ones; the span's includes them (§1.2)."""
    async with deployment(tmp_path, config) as dep:
        result = await dep.client.complete(prompt=PROMPT, provider="claude")
        async with httpx.AsyncClient() as http:  # the same call, raw, to see Anthropic's usage
            raw = await http.post(
                f"{dep.sim.base_url}/v1/messages",
                headers={"x-api-key": KEYS["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"},
                json={
                    "model": MODELS["claude"],
                    "max_tokens": 4096,
                    "messages": [{"role": "user", "content": PROMPT}],
                },
            )
    [span] = recorded.genai_spans()
    usage = raw.json()["usage"]
    assert usage["cache_read_input_tokens"] == 10 and usage["cache_creation_input_tokens"] == 5
    expected = (
        usage["input_tokens"]
        + usage["cache_read_input_tokens"]
        + usage["cache_creation_input_tokens"]
    )
    assert span.attributes["gen_ai.usage.input_tokens"] == expected == result.usage.input_tokens


async def test_ollama_chat_is_a_chat_operation(tmp_path: Path, recorded: Recorded) -> None:
    async with deployment(tmp_path, config) as dep:
        await dep.client.complete(messages=[{"role": "user", "content": "hi"}], provider="ollama")
    [span] = recorded.genai_spans()
    assert span.name == "chat llama2" and span.attributes["gen_ai.operation.name"] == "chat"


#: ``error.type`` of a provider's 503: the error's type as the provider's API names it in its
#: error body (the conventions: "the error code or exception type"), the status code where the
#: API gives no type (Ollama's errors are a bare message).
ERROR_503 = {
    "claude": "api_error",  # Anthropic's type for a 5xx other than its 529 overloaded_error
    "openai": "server_error",
    "gemini": "UNAVAILABLE",
    "ollama": "503",
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("name", list(SPEC_PROVIDER))
async def test_a_failed_call_has_error_type_and_the_duration_metric_says_so(
    tmp_path: Path, recorded: Recorded, name: str, stream: bool
) -> None:
    models = {**MODELS, name: f"{MODELS[name]}-error-503"}
    async with deployment(tmp_path, lambda url: config_text(url, models=models)) as dep:
        with pytest.raises(VaporaError):
            if stream:
                async with dep.client.stream(prompt="x", provider=name) as s:
                    async for _ in s:  # fails before or in the stream
                        pass
            else:
                await dep.client.complete(prompt="x", provider=name)
    [span] = recorded.genai_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == ERROR_503[name]
    assert span.name == f"{SPEC_PROVIDER[name][1]} {models[name]}"
    duration = recorded.metric("gen_ai.client.operation.duration")
    assert duration is not None
    [point] = duration.data.data_points
    assert point.attributes["error.type"] == span.attributes["error.type"]
    assert point.attributes["gen_ai.provider.name"] == SPEC_PROVIDER[name][0]
    assert recorded.metric("gen_ai.client.token.usage") is None  # no usage: not reported


async def test_counts_vapora_estimated_are_billed_but_not_in_the_genai_token_metric(
    tmp_path: Path, recorded: Recorded
) -> None:
    """A stream that ended without its usage chunk: vapora bounds the counts (billed, flagged)
    and the GenAI token histogram took them as the provider's, though the conventions say it
    "MUST NOT" be reported when usage cannot be obtained."""
    models = {**MODELS, "openai": "gpt-4-nousage"}
    async with (
        deployment(tmp_path, lambda url: config_text(url, models=models)) as dep,
        dep.client.stream(prompt="one two three", provider="openai") as s,
    ):
        async for _ in s:
            pass
    [span] = recorded.genai_spans()
    assert span.attributes["vapora.usage.estimated"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] > 0  # billed, on the span
    assert recorded.metric("gen_ai.client.token.usage") is None
    tokens = recorded.metric("vapora_llm_provider_tokens_total")  # what the ledger bills
    assert tokens is not None
    assert sum(p.value for p in tokens.data.data_points) == (
        span.attributes["gen_ai.usage.input_tokens"] + span.attributes["gen_ai.usage.output_tokens"]
    )


# --- the metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_genai_metrics_have_the_specs_names_units_buckets_and_attributes(
    tmp_path: Path, recorded: Recorded, stream: bool
) -> None:
    answered = await _one_of_each(tmp_path, stream)
    expected = (
        set(SPEC_METRICS)
        if stream
        else set(SPEC_METRICS) - {"gen_ai.client.operation.time_to_first_chunk"}
    )
    for name in expected:
        metric = recorded.metric(name)
        assert metric is not None, name
        spec = SPEC_METRICS[name]
        assert metric.unit == spec.unit and isinstance(metric.data, Histogram), name
        points = list(metric.data.data_points)
        providers = {p.attributes["gen_ai.provider.name"] for p in points}
        assert providers == {p for p, _ in SPEC_PROVIDER.values()}, name
        for point in points:
            keys = set(point.attributes)
            assert list(point.explicit_bounds) == spec.buckets, name
            assert spec.required <= keys, (name, keys)
            assert keys <= spec.required | spec.conditional | spec.recommended, (name, keys)
            assert "error.type" not in keys
            assert point.attributes["server.port"] == answered.port, name
    if not stream:
        assert recorded.metric("gen_ai.client.operation.time_to_first_chunk") is None
    tokens = recorded.metric("gen_ai.client.token.usage")
    assert tokens is not None
    kinds = {(p.attributes["gen_ai.provider.name"], p.attributes["gen_ai.token.type"]) for p in
             tokens.data.data_points}  # fmt: skip
    assert kinds == {(p, t) for p, _ in SPEC_PROVIDER.values() for t in ("input", "output")}
    spans = recorded.genai_spans()
    for point in tokens.data.data_points:  # the histogram holds the spans' billed counts
        [span] = [s for s in spans if s.attributes["gen_ai.provider.name"] ==
                  point.attributes["gen_ai.provider.name"]]  # fmt: skip
        key = f"gen_ai.usage.{point.attributes['gen_ai.token.type']}_tokens"
        assert point.sum == span.attributes[key]


# --- content and secrets ----------------------------------------------------------------------


def _everything(recorded: Recorded) -> str:
    """Every span (name, attributes, events, resource) and every metric label, as text."""
    parts = []
    for span in recorded.spans.get_finished_spans():
        parts.append(span.to_json())
    data = recorded.metrics.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    parts.append(f"{metric.name} {dict(point.attributes or {})}")
    return "\n".join(parts)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_no_api_key_and_no_prompt_in_any_span_metric_or_log_line(
    tmp_path: Path, recorded: Recorded, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _one_of_each(tmp_path, stream, system="You are the hidden-system-9 persona")
    # And a call that fails at each provider: error messages, fallbacks and failed spans.
    failing = {name: f"{model}-error-503" for name, model in MODELS.items()}
    async with deployment(
        tmp_path / "failing", lambda url: config_text(url, models=failing)
    ) as dep:
        for name in SPEC_PROVIDER:
            with pytest.raises(VaporaError):
                if stream:
                    async with dep.client.stream(prompt=PROMPT, provider=name) as s:
                        async for _ in s:  # fails before or in the stream
                            pass
                else:
                    await dep.client.complete(prompt=PROMPT, provider=name)
    text = _everything(recorded) + caplog.text  # formatted records, exception text included
    assert "chat claude-opus-4-5" in text  # the search covers the spans ...
    assert "route claude" in caplog.text  # ... and the log lines (the decisions, at INFO) ...
    failed = [s for s in recorded.genai_spans() if "error.type" in s.attributes]
    assert {s.attributes["vapora.provider"] for s in failed} == set(SPEC_PROVIDER)  # ... failures
    for secret in [*KEYS.values(), "secret-plum-7", "hidden-system-9"]:
        assert secret not in text, secret


async def test_with_capture_content_the_messages_are_on_the_span_as_the_opt_in_attributes(
    tmp_path: Path, recorded_with_content: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _one_of_each(tmp_path, stream=False, system="You are the hidden-system-9 persona")
    spans = recorded_with_content.genai_spans()
    assert {s.attributes["vapora.provider"] for s in spans} == set(SPEC_PROVIDER)
    for span in spans:
        a = span.attributes
        assert "secret-plum-7" in str(a["gen_ai.input.messages"])
        assert '"role":"user"' in str(a["gen_ai.input.messages"])
        assert "hidden-system-9" in str(a["gen_ai.system_instructions"])
        assert '"role":"assistant"' in str(a["gen_ai.output.messages"])
    text = _everything(recorded_with_content) + caplog.text
    for secret in KEYS.values():  # keys never, even with content on
        assert secret not in text
