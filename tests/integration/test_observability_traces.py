"""One trace per task across every actor and NATS connection (issue 6): client -> router ->
reservation -> every provider attempt -> the appended events -> the ledger's processing of them.
Real nats-server, real simulator over HTTP, each actor on its own connection."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from actors.cost_ledger import CostLedger
from events.codec import event_tag
from tests.integration.telemetry_harness import BUDGET, guide, separate_deployment
from vapora.config import TelemetryConfig
from vapora.telemetry import Telemetry, setup

pytestmark = pytest.mark.anyio

# Leases on (the default): attempts are admitted against the router's lease, no round trip.
LEASED = "[budget]\ndaily_limit_cents = 1000\n"


@pytest.fixture
def spans() -> AsyncIterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry: Telemetry = setup(
        TelemetryConfig(enabled=True),
        env={},
        span_exporters=[exporter],
        metric_readers=[InMemoryMetricReader()],
    )
    yield exporter
    telemetry.shutdown()


def _by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans if s.context is not None}


def _parent(span: ReadableSpan, index: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return index.get(span.parent.span_id) if span.parent is not None else None


def _named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize("leased", [False, True], ids=["reserved", "leased"])
async def test_a_fallback_task_is_one_trace_across_connections_with_correct_parents(
    tmp_path: Path, spans: InMemorySpanExporter, leased: bool
) -> None:
    config = guide(LEASED if leased else BUDGET, models={"claude": "claude-opus-4-5-error-529"})
    async with separate_deployment(tmp_path, config) as dep:
        if leased:  # else its first attempt may come before the lease and reserve on its own
            await dep.leased()
        spans.clear()
        result = await dep.client.complete(
            prompt="Write a sort", task_type="CodeGeneration", quality="High", task_id="traced-1"
        )
        following = result.attempts[1].provider
        assert [a.provider for a in result.attempts] == ["claude", following]
        model = dep.config.provider(following).model  # type: ignore[union-attr]
        await dep.ledger_caught_up()
        stored = [(seq, e, h) for seq, e, h in await dep.events() if e_task(e) == "traced-1"]
        subject_of = {e.id: dep.log.settings.subject_for(e) for _, e, _ in stored}
    finished = list(spans.get_finished_spans())

    # Exactly one trace holds the task: the client's request is its root.
    traces = {s.context.trace_id for s in finished if s.attributes.get("vapora.task.id")}
    assert len(traces) == 1
    trace_id = traces.pop()
    task = [s for s in finished if s.context.trace_id == trace_id]
    # Nothing of the task's is outside it, also without a task id: the only other spans are
    # the ledger processing events of other traces (providers' health at start, a lease).
    task_events = {e.id for _, e, _ in stored}
    for other in (s for s in finished if s.context.trace_id != trace_id):
        assert re.fullmatch(r"process vapora\.events\.(health\.\w+|budget)", other.name), other.name
        ids = other.attributes.get("vapora.event.ids") or [other.attributes["messaging.message.id"]]
        assert not task_events & set(ids), other.name  # type: ignore[arg-type]
    index = _by_id(task)
    [root] = [s for s in task if s.parent is None]
    assert root.name == "publish vapora.complete" and root.kind is SpanKind.PRODUCER
    for span in task:  # every span hangs off the root through recorded parents
        node: ReadableSpan | None = span
        while node is not None and node is not root:
            node = _parent(node, index)
        assert node is root, f"{span.name} is not connected to the client's span"

    # The router continues the client's trace on its own connection.
    [router] = _named(task, "process vapora.complete")
    assert _parent(router, index) is root and router.kind is SpanKind.CONSUMER
    assert router.attributes["messaging.consumer.group.name"] == "router"
    assert router.attributes["vapora.task.id"] == "traced-1"

    # The reservation: the router's request and the keeper's processing of it, per attempt;
    # none when the router admits the attempts against its lease.
    reserves = _named(task, "publish vapora.budget.reserve")
    assert len(reserves) == (0 if leased else 2)
    assert all(_parent(s, index) is router for s in reserves)
    kept = _named(task, "process vapora.budget.reserve")
    assert sorted(_parent(s, index).context.span_id for s in kept) == sorted(  # type: ignore[union-attr]
        s.context.span_id for s in reserves
    )

    # Both provider attempts, each under the router's request to that provider.
    [claude_call] = _named(task, "process vapora.provider.claude.call")
    [second_call] = _named(task, f"process vapora.provider.{following}.call")
    claude_request = _parent(claude_call, index)
    assert (
        claude_request is not None and claude_request.name == "publish vapora.provider.claude.call"
    )
    # An error reply ends the router's request in error, as it ends the client's (it was UNSET).
    assert claude_request.status.status_code is StatusCode.ERROR
    assert claude_request.attributes["error.type"] == "provider_error"
    # The failed attempt's hold given back: the router's PRODUCER span, the keeper's under it
    # (the keeper's was parented by the router's own span, with no publish between).
    releases = _named(task, "publish vapora.budget.release")
    assert all(s.kind is SpanKind.PRODUCER for s in releases)
    by_router = [s for s in releases if _parent(s, index) is router]
    assert len(by_router) == (0 if leased else 1)
    # The provider actor gives back the hold of a call it ended unbilled too (its router may
    # have stopped waiting), in the call's trace: under its processing of the call.
    [by_provider] = [s for s in releases if s not in by_router]
    assert _parent(by_provider, index) is claude_call
    handled = _named(task, "process vapora.budget.release")
    assert sorted(_parent(s, index).context.span_id for s in handled) == sorted(  # type: ignore[union-attr]
        s.context.span_id for s in releases
    )
    assert _parent(_parent(second_call, index), index) is router  # type: ignore[arg-type]
    [failed] = _named(task, "chat claude-opus-4-5-error-529")
    operation = "generate_content" if following == "gemini" else "chat"
    [succeeded] = _named(task, f"{operation} {model}")
    assert _parent(failed, index) is claude_call and _parent(succeeded, index) is second_call
    assert failed.kind is SpanKind.CLIENT and failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] in ("overloaded_error", "529")
    assert failed.attributes["vapora.attempt"] == 1
    assert "error.type" not in succeeded.attributes
    assert succeeded.attributes["vapora.attempt"] == 2
    reason = str(succeeded.attributes["vapora.route.reason"])
    assert "claude" in reason and "transient" in reason  # after which provider, and why
    assert "claude" in str(failed.attributes["vapora.route.reason"])

    # Every event of the task was appended in a PRODUCER span of this trace (one per append:
    # a span for each event appended alone, one for events appended together, naming them all),
    # and the stored event carries that span's context.
    publishes: dict[str, ReadableSpan] = {}
    for s in task:
        if s.kind is SpanKind.PRODUCER and s.attributes.get("vapora.event.types"):
            assert s.attributes["messaging.batch.message_count"] == len(
                s.attributes["vapora.event.ids"]
            )
            publishes |= dict.fromkeys(s.attributes["vapora.event.ids"], s)
        elif s.kind is SpanKind.PRODUCER and str(s.name).startswith("publish vapora.events."):
            publishes[str(s.attributes["messaging.message.id"])] = s
    tags = {event_tag(e) for _, e, _ in stored}
    assert {"route_decided", "call_failed", "fallback_triggered", "call_succeeded"} <= tags
    assert "spend_recorded" in tags and ("budget_reserved" in tags) is not leased
    batched = [s for s in set(publishes.values()) if s.attributes.get("vapora.event.ids")]
    assert batched, "the provider appends its call's events together"
    for _, event, headers in stored:
        span = publishes[event.id]
        _, stored_trace, stored_parent, _ = headers["traceparent"].split("-")
        assert (stored_trace, stored_parent) == (
            f"{trace_id:032x}",
            f"{span.context.span_id:016x}",
        ), event_tag(event)
        types = span.attributes.get("vapora.event.types") or [span.attributes["vapora.event.type"]]
        assert event_tag(event) in types

    # The ledger processes the task's events in spans of this trace, each parented by the
    # creation context of the first event it processed and linked to the other events' (events
    # arriving in one batch are processed together).
    processed = [
        s
        for s in task
        if s.kind is SpanKind.CONSUMER
        and s.attributes.get("messaging.consumer.group.name") == "ledger"
    ]
    covered: list[str] = []
    for span in processed:
        ids = span.attributes.get("vapora.event.ids") or [span.attributes["messaging.message.id"]]
        covered.extend(ids)  # type: ignore[arg-type]
        producers = [publishes[i] for i in ids]  # type: ignore[index]
        assert _parent(span, index) is producers[0]
        linked = {link.context.span_id for link in span.links}
        others = {p.context.span_id for p in producers} - {producers[0].context.span_id}
        assert linked == others, "every other creation context is linked"
        if len(ids) == 1:  # type: ignore[arg-type]
            # Named after the event's own subject, also when the ledger's tail fetched it apart
            # from the events appended with it (their PRODUCER span names the stream's wildcard).
            assert span.name == f"process {subject_of[ids[0]]}"  # type: ignore[index]
        else:
            assert span.attributes["messaging.batch.message_count"] == len(ids)  # type: ignore[arg-type]
            assert str(span.name).startswith("process vapora.events.")
    assert sorted(covered) == sorted(e.id for _, e, _ in stored)


def e_task(event: object) -> str | None:
    return getattr(event, "task_id", None)


async def test_a_ledger_replaying_the_log_links_to_the_events_traces_and_never_parents(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with separate_deployment(tmp_path, guide(), ledger=False) as dep:
        result = await dep.client.complete(prompt="hi", task_type="CodeGeneration", task_id="r-1")
        stored = [(e, h) for _, e, h in await dep.events()]
        [request_root] = [
            s for s in spans.get_finished_spans() if s.name == "publish vapora.complete"
        ]
        spans.clear()
        # A ledger starting now (a new deployment's, or after losing its file) replays the log.
        ledger = CostLedger(await dep.runtime("late-ledger"))
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            ledger.stop()
    assert result.provider and ledger.replayed_events == len(stored)
    replayed = [s for s in spans.get_finished_spans() if s.attributes.get("vapora.replay")]
    assert replayed, "the replay made no span"
    linked = set()
    for span in replayed:
        assert span.parent is None  # a root of its own, never under the events' traces
        assert span.context.trace_id != request_root.context.trace_id
        assert span.kind is SpanKind.CONSUMER
        assert span.name == "process vapora.events.>"
        assert span.attributes["messaging.consumer.group.name"] == "ledger"
        linked |= {(link.context.trace_id, link.context.span_id) for link in span.links}
    for _, headers in stored:  # every stored event's creation context is linked
        _, trace_hex, span_hex, _ = headers["traceparent"].split("-")
        assert (int(trace_hex, 16), int(span_hex, 16)) in linked


async def test_a_sampled_out_task_records_no_span_anywhere_but_keeps_one_trace_id(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup(
        TelemetryConfig(enabled=True, sample_ratio=0.0), env={}, span_exporters=[exporter]
    )
    try:
        async with separate_deployment(tmp_path, guide()) as dep:
            await dep.client.complete(prompt="hi", task_type="CodeGeneration", task_id="s-0")
            await dep.ledger_caught_up()
            stored = [h for _, e, h in await dep.events() if e_task(e) == "s-0"]
    finally:
        telemetry.shutdown()
    assert exporter.get_finished_spans() == ()
    contexts = {h["traceparent"].split("-")[1] for h in stored}
    assert len(contexts) == 1 and len(stored) >= 4  # the decision travelled, unrecorded
    assert all(int(h["traceparent"].split("-")[3], 16) & 1 == 0 for h in stored)  # not sampled


@pytest.mark.parametrize("ratio", [1.0, 0.0], ids=["sampled", "sampled-out"])
async def test_a_callers_baggage_reaches_the_actors_but_is_never_stored_with_the_events(
    tmp_path: Path, ratio: float
) -> None:
    """The events of a task whose caller sent baggage (a user or tenant id, up to 8 KB) each
    stored it, in a stream that is never deleted; they carry their trace context alone."""
    from opentelemetry import baggage, context

    telemetry = setup(TelemetryConfig(enabled=True, sample_ratio=ratio), env={}, span_exporters=[])
    try:
        async with separate_deployment(tmp_path, guide()) as dep:
            tracer = telemetry.tracer_provider.get_tracer("a-service")  # type: ignore[union-attr]
            token = context.attach(baggage.set_baggage("user", "alice" * 100))
            try:
                with tracer.start_as_current_span("caller") as caller:
                    await dep.client.complete(
                        prompt="hi", task_type="CodeGeneration", task_id="b-0"
                    )
            finally:
                context.detach(token)
            await dep.ledger_caught_up()
            stored = [h for _, e, h in await dep.events() if e_task(e) == "b-0"]
    finally:
        telemetry.shutdown()
    assert len(stored) >= 4
    assert all("baggage" not in h for h in stored), [sorted(h) for h in stored]
    trace_hex = f"{caller.get_span_context().trace_id:032x}"
    assert {h["traceparent"].split("-")[1] for h in stored} == {trace_hex}


async def test_a_stream_its_caller_cancels_keeps_the_cancel_in_its_trace(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """The cancel (``vapora.stream.cancel``) went out with no trace context and no spans, so
    nothing in the trace said why the provider stopped; and the cut was recorded as the
    provider's failure: the router's span ERROR ``provider_error``, the call's class
    ``stream_broken``. The cancel is now a PRODUCER span under the stream's, processed under
    it by the provider actor, and the cut is the caller's cancel, not a failure."""
    models = {"claude": "claude-opus-4-5-len-40-tps-20"}  # 40 chunks over two seconds
    async with separate_deployment(tmp_path, guide(BUDGET, models=models)) as dep:
        spans.clear()
        async with dep.client.stream(
            prompt="a b", task_type="CodeGeneration", quality="High", task_id="left"
        ) as stream:
            async for _ in stream:
                break
        with anyio.fail_after(10):
            while not [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]:  # noqa: ASYNC110 - the exporter is polled
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
    task = list(spans.get_finished_spans())
    index = _by_id(task)
    [root] = _named(task, "publish vapora.stream")
    [cancel] = _named(task, "publish vapora.stream.cancel")
    assert _parent(cancel, index) is root and cancel.kind is SpanKind.PRODUCER
    [stopped] = _named(task, "process vapora.stream.cancel")
    assert _parent(stopped, index) is cancel and stopped.kind is SpanKind.CONSUMER
    [call] = [s for s in task if s.name.startswith("chat ")]
    assert call.context.trace_id == root.context.trace_id
    assert call.attributes["error.type"] == "cancelled_by_caller"
    assert call.attributes["vapora.error.class"] == "cancelled"
    [router] = _named(task, "process vapora.stream")
    assert router.status.status_code is not StatusCode.ERROR
    # Nor the router's request to the provider, nor the provider actor's handling of it (both
    # were ERROR provider_error after the first fix: only the router's own span was spared).
    [request] = _named(task, "publish vapora.provider.claude.call")
    [handled] = _named(task, "process vapora.provider.claude.call")
    assert request.status.status_code is not StatusCode.ERROR
    assert handled.status.status_code is not StatusCode.ERROR


async def test_a_tier_change_a_settled_spend_caused_is_in_that_tasks_trace(
    tmp_path: Path, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A tier change caused by a reservation was in the task's trace; one caused by a spend
    settling (read from the log, announced later) was a new root trace, and its log lines (the
    keeper's and the routers') named no task and no trace."""
    import logging

    # A cent a day: a reservation of most of it (340 tokens of Opus output) moves the tier up,
    # and its spend, settling far below it, down again.
    tiny = "[budget]\ndaily_limit_cents = 1\nlease_cents = 0\n"
    with caplog.at_level(logging.INFO):
        async with separate_deployment(tmp_path, guide(tiny)) as dep:
            spans.clear()
            for _ in range(5):
                await dep.client.complete(
                    prompt="hi", task_type="CodeGeneration", quality="High", max_tokens=340,
                    task_id="tiered",
                )  # fmt: skip
                await anyio.sleep(0.2)  # the spend settles (a fall is announced after it)
                if len(_tier_changes(spans)) >= 2:
                    break
    changes = _tier_changes(spans)
    assert len(changes) >= 2  # up at a reservation, down once a spend settled it
    index = _by_id(list(spans.get_finished_spans()))
    for change in changes:
        assert change.parent is not None, "a tier change outside any trace"
        node: ReadableSpan | None = change
        while node is not None and node.parent is not None:
            node = _parent(node, index)
        assert node is not None and node.name == "publish vapora.complete"
    lines = [r for r in caplog.records if "budget tier" in r.getMessage()]
    keeper = [r for r in lines if r.name == "vapora.budget"]
    assert keeper and all(r.task_id == "tiered" for r in keeper)  # type: ignore[attr-defined]
    # The router's line for the same change names the task too (it said `task=-`).
    router = [r for r in lines if r.name == "vapora.router"]
    assert router and all(r.task_id == "tiered" for r in router)  # type: ignore[attr-defined]
    assert all(r.trace_id != "-" for r in lines)  # type: ignore[attr-defined]


def _tier_changes(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.PRODUCER
        and "budget_tier_changed"
        in str(s.attributes.get("vapora.event.types", ""))
        + str(s.attributes.get("vapora.event.type", ""))
    ]


async def test_an_audit_replaying_the_log_links_to_the_events_traces_and_never_parents(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """``vapora audit`` emitted no span at all with telemetry on: the half of "replays and
    audits link to the original spans" for audits was missing. Its replay is now spanned as
    the ledger's is: roots of their own (group ``audit``), linking to the events' contexts."""
    from vapora.cli.money import audit_command

    async with separate_deployment(tmp_path, guide()) as dep:
        await dep.client.complete(prompt="hi", task_type="CodeGeneration", task_id="a-1")
        await dep.ledger_caught_up()
        stored = [(e, h) for _, e, h in await dep.events()]
        spans.clear()
        code, text = await audit_command(dep.client.nc, dep.log, tmp_path / "ledger")
    assert code == 0, text
    audited = [
        s
        for s in spans.get_finished_spans()
        if s.attributes.get("messaging.consumer.group.name") == "audit"
    ]
    assert audited, "the audit made no span"
    linked = set()
    for span in audited:
        assert span.parent is None and span.attributes["vapora.replay"] is True
        assert span.name == "process vapora.events.>"
        linked |= {(link.context.trace_id, link.context.span_id) for link in span.links}
    for _, headers in stored:
        _, trace_hex, span_hex, _ = headers["traceparent"].split("-")
        assert (int(trace_hex, 16), int(span_hex, 16)) in linked
