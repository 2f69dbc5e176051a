"""A service tracing with its own OpenTelemetry SDK calls vapora through ``vapora.Client``: its
current span's context goes with every request as W3C ``traceparent`` (and ``tracestate``),
although vapora's own telemetry is off in its process. Without a current span no header is
sent. Real nats-server; a stand-in for vapora records what each request carried."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from actors.server import EmbeddedNats
from events import subjects
from vapora.client import Client
from vapora.errors import InternalError
from vapora.telemetry import STATE

pytestmark = pytest.mark.anyio

_ERROR = b'{"error":{"code":"internal","message":"stand-in"}}'
_ERROR_HEADERS = {"Nats-Service-Error-Code": "500", "Nats-Service-Error": "stand-in"}


@pytest.fixture
async def received(server: EmbeddedNats) -> AsyncIterator[list[dict[str, str] | None]]:
    """Every request vapora's subjects get: its headers; each is answered with an error (a
    stream's with an error message), which is all the client needs to return."""
    seen: list[dict[str, str] | None] = []
    nc = await nats.connect(server.url)

    async def answer(msg: Msg) -> None:
        seen.append(msg.headers)
        if msg.subject == subjects.STREAM:
            error = {"type": "error", "error": {"code": "internal", "message": "stand-in"}}
            await nc.publish(msg.reply, msgspec.json.encode(error))
        else:
            await nc.publish(msg.reply, _ERROR, headers=_ERROR_HEADERS)

    for subject in (subjects.COMPLETE, subjects.STREAM, subjects.REPORT, subjects.BUDGET):
        await nc.subscribe(subject, cb=answer)
    await nc.flush()
    yield seen
    await nc.close()


@pytest.fixture
async def client(server: EmbeddedNats) -> AsyncIterator[Client]:
    assert not STATE.tracing  # vapora's own telemetry is off in this process
    nc = await nats.connect(server.url)
    yield Client(nc, timeout_s=5)
    await nc.close()


async def _stream(client: Client) -> None:
    async with client.stream(prompt="hi") as story:
        async for _ in story:
            pass


CALLS: dict[str, Callable[[Client], Awaitable[Any]]] = {
    "complete": lambda c: c.complete(prompt="hi"),
    "stream": _stream,
    "report": lambda c: c.report(),
    "budget": lambda c: c.budget(),
}

# The service's own SDK: a tracer provider of its own (not vapora's), as a service sets up.
_TRACER = TracerProvider().get_tracer("checkout-service")


async def _called(client: Client, call: str) -> None:
    with pytest.raises(InternalError):
        await CALLS[call](client)


@pytest.mark.parametrize("call", list(CALLS))
async def test_the_callers_span_travels_with_every_request_with_vapora_telemetry_off(
    client: Client, received: list[dict[str, str] | None], call: str
) -> None:
    with _TRACER.start_as_current_span("checkout.summarise") as span:
        await _called(client, call)
    context = span.get_span_context()
    [headers] = received
    assert headers is not None
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled, as the caller's span is
    assert "tracestate" not in headers


@pytest.mark.parametrize("call", ["complete", "stream"])
async def test_the_callers_trace_state_travels_too(
    client: Client, received: list[dict[str, str] | None], call: str
) -> None:
    # The caller's span continues a trace that came with vendor state: it goes on to vapora.
    remote = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("congo", "t61rcWkgMzE")]),
    )
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    with _TRACER.start_as_current_span("checkout.summarise", context=parent):
        await _called(client, call)
    [headers] = received
    assert headers is not None
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert headers["tracestate"] == "congo=t61rcWkgMzE"


@pytest.mark.parametrize("call", list(CALLS))
async def test_without_a_current_span_no_trace_header_is_sent(
    client: Client, received: list[dict[str, str] | None], call: str
) -> None:
    await _called(client, call)
    [headers] = received
    assert not headers or "traceparent" not in headers
