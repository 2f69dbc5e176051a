"""An actor's error replies and the ``process`` span that sends them: every error answer (a
handler's error, a timeout's 504, an overload's 503) leaves the span with status ERROR and the
error's contract code as ``error.type``, and carries the span's trace context in its headers.
Real nats-server, an actor service of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from actors.connection import Client
from actors.server import EmbeddedNats
from actors.service import ActorService, Endpoint, RequestContext
from vapora.config import TelemetryConfig
from vapora.errors import BudgetExceeded
from vapora.telemetry import setup

pytestmark = pytest.mark.anyio

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = {"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}


class Ask(msgspec.Struct):
    what: str = ""


class Done(msgspec.Struct):
    ok: bool = True


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = setup(TelemetryConfig(enabled=True), env={}, span_exporters=[exporter])
    yield exporter
    telemetry.shutdown()


@pytest.fixture
async def caller(server: EmbeddedNats) -> AsyncIterator[NATS]:
    nc = await nats.connect(server.url)
    yield nc
    await nc.close()


async def _handle(request: Ask, context: RequestContext) -> Done:
    match request.what:
        case "over budget":
            raise BudgetExceeded("no provider within the budget")
        case "bug":
            raise RuntimeError("a bug")
        case "slow":
            await anyio.sleep(30)
    return Done()


def _service(nc: Client, **options: object) -> ActorService:
    endpoint = Endpoint(name="e", subject="probe.e", request_type=Ask, handler=_handle, timeout=0.3)
    return ActorService(nc, name="probe", endpoints=[endpoint], **options)  # type: ignore[arg-type]


def _process_span(spans: InMemorySpanExporter) -> ReadableSpan:
    [span] = [s for s in spans.get_finished_spans() if s.name == "process probe.e"]
    return span


def _sent_inside(reply_headers: dict[str, str], span: ReadableSpan) -> bool:
    """Whether the reply carries ``span``'s context (the caller's trace, the span's id)."""
    _, trace_id, span_id, _ = reply_headers["traceparent"].split("-")
    assert span.context is not None
    return trace_id == TRACE and span_id == f"{span.context.span_id:016x}"


@pytest.mark.parametrize(
    ("what", "status", "code"),
    [
        ("over budget", "402", "budget_exceeded"),
        ("bug", "500", "internal"),
        ("slow", "504", "timeout"),
    ],
)
async def test_an_error_reply_fails_its_process_span_with_the_errors_code(
    conn: Client,
    caller: NATS,
    spans: InMemorySpanExporter,
    what: str,
    status: str,
    code: str,
) -> None:
    service = _service(conn)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        body = msgspec.json.encode(Ask(what=what))
        reply = await caller.request("probe.e", body, timeout=5, headers=CALLER)
        service.stop()
    headers = reply.headers or {}
    assert headers["Nats-Service-Error-Code"] == status
    span = _process_span(spans)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == code
    assert _sent_inside(headers, span)


async def test_an_answer_leaves_its_process_span_unset(
    conn: Client, caller: NATS, spans: InMemorySpanExporter
) -> None:
    service = _service(conn)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        reply = await caller.request("probe.e", b"{}", timeout=5, headers=CALLER)
        service.stop()
    span = _process_span(spans)
    assert span.status.status_code is StatusCode.UNSET and "error.type" not in span.attributes
    assert _sent_inside(reply.headers or {}, span)


async def test_an_overloaded_refusal_is_sent_in_a_failed_process_span(
    conn: Client, caller: NATS, spans: InMemorySpanExporter
) -> None:
    service = _service(conn, max_concurrency=1, max_backlog=0)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        busy = msgspec.json.encode(Ask(what="slow"))  # holds the one slot until its timeout
        tg.start_soon(lambda: caller.request("probe.e", busy, timeout=5))
        while service.in_flight == 0:  # noqa: ASYNC110 - until the service took the first
            await anyio.sleep(0.01)
        reply = await caller.request("probe.e", b"{}", timeout=5, headers=CALLER)
        service.stop()
    headers = reply.headers or {}
    assert headers["Nats-Service-Error-Code"] == "503"
    [refused] = [
        s
        for s in spans.get_finished_spans()
        if s.name == "process probe.e" and s.attributes.get("error.type") == "overloaded"
    ]
    assert refused.status.status_code is StatusCode.ERROR
    assert _sent_inside(headers, refused)


async def test_requests_a_stop_cuts_or_never_starts_are_refused_in_failed_process_spans(
    conn: Client, caller: NATS, spans: InMemorySpanExporter
) -> None:
    service = _service(conn, max_concurrency=1, max_backlog=1, drain_timeout=0.05)
    replies: dict[str, dict[str, str]] = {}

    async def ask(what: str) -> None:
        body = msgspec.json.encode(Ask(what=what))
        reply = await caller.request("probe.e", body, timeout=5, headers=CALLER)
        replies[what] = reply.headers or {}

    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        tg.start_soon(ask, "slow")  # running when the stop comes: cut
        while service.in_flight < 1:  # noqa: ASYNC110 - until the service took it
            await anyio.sleep(0.01)
        tg.start_soon(ask, "waiting")  # in the backlog when the stop comes: never started
        while service.in_flight < 2:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        service.stop()
    refused = [
        s
        for s in spans.get_finished_spans()
        if s.name == "process probe.e" and s.attributes.get("error.type") == "overloaded"
    ]
    assert len(refused) == 2
    for what in ("slow", "waiting"):
        assert replies[what]["Nats-Service-Error-Code"] == "503"
        assert any(_sent_inside(replies[what], span) for span in refused), what
    assert all(span.status.status_code is StatusCode.ERROR for span in refused)
