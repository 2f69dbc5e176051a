"""The actor runtime against a real nats-server: typed requests, 400s that name the problem, the
error tree as service errors, bounded concurrency, $SRV discovery, trace continuation, drain."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from actors import tracing
from actors.connection import ConnectOptions, connect
from actors.server import EmbeddedNats
from actors.service import ActorService, Endpoint, RequestContext
from events import CompletionRequest, ErrorReply, decode
from vapora.errors import BudgetExceeded

pytestmark = pytest.mark.anyio


class Echo(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    count: int


async def echo(request: CompletionRequest, context: RequestContext) -> Echo:
    if request.prompt == "broke":
        raise BudgetExceeded("daily limit reached")
    if request.prompt == "bug":
        raise RuntimeError("secret internals")
    if request.prompt == "slow":
        await anyio.sleep(0.3)
    return Echo(text=request.prompt or "", count=len(request.prompt or ""))


@pytest.fixture
async def service(nc: NATS, unique: str) -> AsyncIterator[tuple[ActorService, str]]:
    subject = f"t{unique}.echo"
    actor = ActorService(
        nc,
        name=f"echo-{unique}",
        endpoints=[
            Endpoint(name="echo", subject=subject, request_type=CompletionRequest, handler=echo)
        ],
        max_concurrency=64,
        drain_timeout=5,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        yield actor, subject
        actor.stop()


async def ask(nc: NATS, subject: str, body: bytes) -> tuple[dict[str, str], bytes]:
    reply = await nc.request(subject, body, timeout=5)
    return reply.headers or {}, reply.data


def one_endpoint(nc: NATS, name: str, subject: str, handler: Any, **options: Any) -> ActorService:
    """An actor serving one endpoint ``e`` on ``subject`` that takes completion requests."""
    endpoint = Endpoint(name="e", subject=subject, request_type=CompletionRequest, handler=handler)
    return ActorService(nc, name=name, endpoints=[endpoint], **options)


async def test_a_good_request_is_decoded_and_answered(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    _, subject = service
    headers, data = await ask(nc, subject, b'{"prompt": "hello"}')
    assert "Nats-Service-Error-Code" not in headers
    assert json.loads(data) == {"text": "hello", "count": 5}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{this is not json", "malformed JSON"),
        (b'{"prompt": "hi", "colour": "blue"}', "unknown field `colour`"),
        (b'{"prompt": 7}', "$.prompt"),
        (b'{"messages": [{"role": "user"}]}', "missing required field `content`"),
        (b'{"prompt": "x", "max_tokens": "many"}', "$.max_tokens"),
    ],
)
async def test_bad_input_gets_400_naming_the_problem_and_the_actor_serves_on(
    nc: NATS, service: tuple[ActorService, str], body: bytes, named: str
) -> None:
    _, subject = service
    headers, data = await ask(nc, subject, body)
    assert headers["Nats-Service-Error-Code"] == "400"
    error = decode(data, ErrorReply).error
    assert error.code == "invalid_request"
    assert named in error.message
    assert named in headers["Nats-Service-Error"]
    _, good = await ask(nc, subject, b'{"prompt": "still here"}')
    assert json.loads(good)["text"] == "still here"


async def test_ten_megabytes_of_garbage_gets_400_and_the_actor_serves_on(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    _, subject = service
    headers, data = await ask(nc, subject, bytes(range(256)) * 40960)
    assert headers["Nats-Service-Error-Code"] == "400"
    assert "10485760 bytes" in decode(data, ErrorReply).error.message
    _, good = await ask(nc, subject, b'{"prompt": "next"}')
    assert json.loads(good)["text"] == "next"


async def test_a_request_whose_reply_subject_is_not_utf8_is_dropped_and_the_actor_serves_on(
    nats_server: EmbeddedNats,
    nc: NATS,
    service: tuple[ActorService, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone allowed to publish to a served subject can send a reply subject that is not
    UTF-8 (the server passes it on). It cannot be answered; it must not stop the connection's
    reader, which would leave every actor on that connection deaf while it looks connected."""
    _, subject = service
    host, port = nats_server.url.removeprefix("nats://").split(":")
    raw = await anyio.connect_tcp(host, int(port))
    async with raw:
        await raw.receive()  # INFO
        await raw.send(
            b'CONNECT {"verbose":false}\r\n'
            + b"PUB "
            + subject.encode()
            + b" _INBOX.\xff\xfe 2\r\n{}\r\nPING\r\n"
        )
        assert b"PONG" in await raw.receive()  # the server took the message
    with anyio.fail_after(10):
        _, good = await ask(nc, subject, b'{"prompt": "still here"}')
    assert json.loads(good)["text"] == "still here"
    assert any("not UTF-8" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "reply",
    [
        "vapora.events.route",
        "$JS.API.STREAM.DELETE.VAPORA_EVENTS",
        "_INBOX.*",
        "a.>",
        "a..b",
        # vapora's own request subjects: each answer landed there as a request (a stream
        # answered to vapora.stream.cancel had every provider actor log every chunk)
        "vapora.stream.cancel",
        "vapora.complete",
        "vapora.provider.openai.call",
    ],
)
async def test_a_request_whose_answer_must_not_be_published_is_dropped(
    nc: NATS, service: tuple[ActorService, str], reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply subject under the event log's subjects would have the stream store the answer as
    an event no reader can decode (every projection stopped on it); a system subject would send
    the answer to JetStream's API; a wildcard or malformed one is a protocol error. Dropped,
    counted, and the actor serves on."""
    actor, subject = service
    events = await nc.subscribe("vapora.events.>")
    system = await nc.subscribe("$JS.API.>")
    own = [await nc.subscribe(reply)] if reply.startswith(("vapora.stream", "vapora.co")) else []
    provider = await nc.subscribe("vapora.provider.>")
    await nc.publish(subject, b'{"prompt": "hello"}', reply=reply)
    _, good = await ask(nc, subject, b'{"prompt": "still here"}')
    assert json.loads(good)["text"] == "still here"
    for sub in (events, system, provider, *own):
        with pytest.raises(TimeoutError):
            await sub.next_msg(timeout=0.2)
    assert actor._served["echo"].counters.dropped == 1
    assert any("dropped" in r.getMessage() for r in caplog.records)


async def test_an_endpoint_that_needs_a_reply_drops_a_request_without_one(
    nc: NATS, unique: str
) -> None:
    """A completion or a provider call without a reply subject would be paid for and answered
    to nobody."""
    called: list[str] = []

    async def handler(request: CompletionRequest, context: RequestContext) -> Echo:
        called.append(request.prompt or "")
        return Echo(text="", count=0)

    subject = f"t{unique}.paid"
    endpoint = Endpoint(
        name="e",
        subject=subject,
        request_type=CompletionRequest,
        handler=handler,
        needs_reply=True,
    )
    actor = ActorService(nc, name=f"paid-{unique}", endpoints=[endpoint])
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        await nc.publish(subject, b'{"prompt": "nobody listens"}')
        await ask(nc, subject, b'{"prompt": "asked"}')
        assert called == ["asked"]
        assert actor._served["e"].counters.dropped == 1
        actor.stop()


async def test_domain_errors_keep_their_contract_code(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    _, subject = service
    headers, data = await ask(nc, subject, b'{"prompt": "broke"}')
    assert headers["Nats-Service-Error-Code"] == "402"
    assert decode(data, ErrorReply).error.code == "budget_exceeded"


async def test_a_bug_is_a_500_without_internals(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    _, subject = service
    headers, data = await ask(nc, subject, b'{"prompt": "bug"}')
    assert headers["Nats-Service-Error-Code"] == "500"
    assert "secret internals" not in data.decode()
    assert decode(data, ErrorReply).error.code == "internal"


async def test_requests_run_concurrently_not_one_at_a_time(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    """Twenty 0.3 s handlers finish together; serially they would take six seconds."""
    _, subject = service
    done = 0

    async def one() -> None:
        nonlocal done
        _, data = await ask(nc, subject, b'{"prompt": "slow"}')
        done += json.loads(data)["count"] == 4

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
    assert done == 20


async def test_services_are_discoverable_with_srv_ping_info_and_stats(
    nc: NATS, service: tuple[ActorService, str], unique: str
) -> None:
    _, subject = service
    await ask(nc, subject, b'{"prompt": "x"}')
    await ask(nc, subject, b"nope")
    ping = json.loads((await nc.request(f"$SRV.PING.echo-{unique}", b"", timeout=2)).data)
    assert ping["name"] == f"echo-{unique}"
    info = json.loads((await nc.request(f"$SRV.INFO.echo-{unique}", b"", timeout=2)).data)
    assert [e["subject"] for e in info["endpoints"]] == [subject]
    stats = json.loads((await nc.request(f"$SRV.STATS.echo-{unique}", b"", timeout=2)).data)
    [endpoint] = stats["endpoints"]
    assert endpoint["num_requests"] == 2
    assert endpoint["data"]["errors"] == 1
    assert endpoint["data"]["errors_by_code"] == {"invalid_request": 1}


async def test_stop_finishes_in_flight_work_then_stops_taking_new_work(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.drain"
    actor = one_endpoint(nc, f"drain-{unique}", subject, echo)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        results: list[bytes] = []

        async def slow() -> None:
            results.append((await nc.request(subject, b'{"prompt": "slow"}', timeout=5)).data)

        tg.start_soon(slow)
        while not actor.in_flight:  # noqa: ASYNC110 - polls the actor's counter
            await anyio.sleep(0.01)
        actor.stop()  # while the slow handler runs
    assert json.loads(results[0])["count"] == 4
    with pytest.raises(Exception, match=r"no responders|timeout"):
        await nc.request(subject, b'{"prompt": "late"}', timeout=0.5)


async def test_a_request_the_server_delivered_before_the_actors_unsubscribe_is_answered(
    nc: NATS, unique: str
) -> None:
    """stop() right after a request was sent on the actor's connection: the server delivers it
    before it reads the UNSUB that follows, so the actor has it, and must answer it (the
    requester would otherwise wait out its whole timeout, and no other member of the queue
    group is offered it)."""
    subject = f"t{unique}.stopping"
    actor = one_endpoint(nc, f"stopping-{unique}", subject, echo)
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            await nc.publish(subject, b'{"prompt": "late"}', reply=inbox)
            actor.stop()  # the PUB is ahead of the UNSUB on this connection
        reply = await replies.next_msg(timeout=5)
    assert json.loads(reply.data) == {"text": "late", "count": 4}
    await replies.unsubscribe()


async def test_requests_waiting_in_the_backlog_when_stop_is_called_are_served_in_the_drain(
    nc: NATS, unique: str
) -> None:
    """The drain waits for the backlog too (it counts as in flight): each request waiting there
    starts when a handler finishes, and is answered before run() returns."""
    subject = f"t{unique}.backlog"
    release = anyio.Event()

    async def hold(request: CompletionRequest, context: RequestContext) -> Echo:
        await release.wait()
        return Echo(text=request.prompt or "", count=0)

    actor = one_endpoint(
        nc, f"backlog-{unique}", subject, hold, max_concurrency=1, drain_timeout=30
    )
    texts: list[str] = []

    async def one(prompt: str) -> None:
        body = json.dumps({"prompt": prompt}).encode()
        texts.append(json.loads((await nc.request(subject, body, timeout=30)).data)["text"])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(one, "running")
            tg.start_soon(one, "waiting")
            while actor.in_flight < 2:  # noqa: ASYNC110 - polls the actor's counter
                await anyio.sleep(0.01)
            actor.stop()
            release.set()
    assert sorted(texts) == ["running", "waiting"]


async def test_a_clients_trace_continues_in_an_actor_on_another_connection(
    nats_server: EmbeddedNats, service: tuple[ActorService, str], spans: InMemorySpanExporter
) -> None:
    _, subject = service
    client = await connect(ConnectOptions.from_url(nats_server.url, name="other"))
    try:
        with tracing.tracer.start_as_current_span("client task") as root:
            reply = await client.request(
                subject, b'{"prompt": "traced"}', headers=tracing.inject(), timeout=5
            )
        trace_id = root.get_span_context().trace_id
    finally:
        await client.close()
    process = [s for s in spans.get_finished_spans() if s.name == f"process {subject}"]
    assert len(process) == 1
    span = process[0]
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == root.get_span_context().span_id
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes["messaging.system"] == "nats"
    assert span.attributes["messaging.destination.name"] == subject
    assert span.attributes["messaging.consumer.group.name"] == "q"
    # The reply carries the handler's context back to the caller.
    assert (reply.headers or {})["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_past_concurrency_and_backlog_the_sender_gets_503_overloaded_not_a_hang(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.tight"
    actor = one_endpoint(nc, f"tight-{unique}", subject, echo, max_concurrency=2, max_backlog=2)
    codes: list[str] = []

    async def one() -> None:
        reply = await nc.request(subject, b'{"prompt": "slow"}', timeout=5)
        codes.append((reply.headers or {}).get("Nats-Service-Error-Code", "ok"))

    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        with anyio.fail_after(4):
            async with anyio.create_task_group() as senders:
                for _ in range(8):
                    senders.start_soon(one)
        actor.stop()
    assert sorted(codes) == ["503"] * 4 + ["ok"] * 4


async def test_requests_to_nobody_fail_at_once_with_no_responders_and_silence_times_out(
    nc: NATS, unique: str
) -> None:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    with anyio.fail_after(2):
        with pytest.raises(NoRespondersError):
            await nc.request(f"t{unique}.nobody", b"{}", timeout=5)
    silent = await nc.subscribe(f"t{unique}.silent")
    with pytest.raises(NatsTimeout):
        await nc.request(f"t{unique}.silent", b"{}", timeout=0.2)
    await silent.unsubscribe()


async def test_many_concurrent_requests_each_get_their_own_reply(
    nc: NATS, service: tuple[ActorService, str]
) -> None:
    _, subject = service
    texts = [f"n{i}" for i in range(300)]
    got: dict[str, str] = {}

    async def one(text: str) -> None:
        reply = await nc.request(subject, json.dumps({"prompt": text}).encode(), timeout=5)
        got[text] = json.loads(reply.data)["text"]

    async with anyio.create_task_group() as tg:
        for text in texts:
            tg.start_soon(one, text)
    assert got == {t: t for t in texts}


async def test_a_handler_past_its_endpoint_timeout_gets_504_and_the_actor_serves_on(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.timeout"

    async def stuck(request: CompletionRequest, context: RequestContext) -> Echo:
        if request.prompt == "stuck":
            await anyio.sleep(30)
        return Echo(text=request.prompt or "", count=0)

    actor = ActorService(
        nc,
        name=f"timeout-{unique}",
        endpoints=[
            Endpoint(
                name="e",
                subject=subject,
                request_type=CompletionRequest,
                handler=stuck,
                timeout=0.3,
            )
        ],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        with anyio.fail_after(5):
            headers, data = await ask(nc, subject, b'{"prompt": "stuck"}')
        assert headers["Nats-Service-Error-Code"] == "504"
        assert decode(data, ErrorReply).error.code == "timeout"
        _, data = await ask(nc, subject, b'{"prompt": "next"}')
        assert json.loads(data)["text"] == "next"
        assert actor.in_flight == 0
        actor.stop()


async def test_work_left_at_the_drain_deadline_is_cancelled_but_shielded_steps_finish(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.deadline"
    finished: list[str] = []
    entered = anyio.Event()

    async def hangs(request: CompletionRequest, context: RequestContext) -> Echo:
        if request.prompt == "shielded":
            with anyio.CancelScope(shield=True):
                entered.set()
                await anyio.sleep(0.5)  # outlives the drain deadline, yet must complete
                finished.append("shielded")
        await anyio.sleep(30)
        finished.append("never")
        return Echo(text="", count=0)

    actor = one_endpoint(nc, f"deadline-{unique}", subject, hangs, drain_timeout=0.2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            await nc.publish(subject, b'{"prompt": "shielded"}')
            await nc.publish(subject, b'{"prompt": "plain"}')
            await entered.wait()
            started = anyio.current_time()
            actor.stop()
        # run() returned: the plain handler was cancelled at the deadline, the shielded step
        # ran to its end first (as inside a task group), and nothing was left behind.
        assert anyio.current_time() - started >= 0.4
    assert finished == ["shielded"]
    assert actor.in_flight == 0


async def test_a_request_cut_by_the_stop_is_answered_503_not_left_waiting(
    nc: NATS, unique: str
) -> None:
    """A handler still running when the drain deadline passes is cancelled; its caller used to
    get nothing and waited out its own timeout (a router's caller, minutes)."""
    subject = f"t{unique}.cut"
    entered = anyio.Event()

    async def hangs(request: CompletionRequest, context: RequestContext) -> Echo:
        entered.set()
        await anyio.sleep(30)
        return Echo(text="", count=0)

    actor = one_endpoint(nc, f"cut-{unique}", subject, hangs, drain_timeout=0.2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            replies: list[Msg] = []

            async def caller() -> None:
                replies.append(await nc.request(subject, b'{"prompt": "x"}', timeout=20))

            tg.start_soon(caller)
            await entered.wait()
            actor.stop()
    [reply] = replies
    headers = reply.headers or {}
    assert headers.get("Nats-Service-Error-Code") == "503"
    assert "stopped before this request finished" in headers.get("Nats-Service-Error", "")
    assert headers.get("Vapora-Outcome") == "unknown"  # it ran: what it did is not known
    assert json.loads(reply.data)["error"]["code"] == "overloaded"


async def test_a_request_delivered_after_a_hard_stop_is_refused_not_dropped(
    nc: NATS, unique: str
) -> None:
    """Stopped hard, a service cancels its handlers before its endpoints leave the server; a
    request delivered in between was dropped, its sender waiting out its whole timeout. It is
    refused (503: it never ran, so it may go elsewhere at once)."""
    subject = f"t{unique}.late"

    async def echo(request: CompletionRequest, context: RequestContext) -> Echo:
        return Echo(text=request.prompt or "", count=0)

    actor = one_endpoint(nc, f"late-{unique}", subject, echo)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            actor._closed = True  # the window between the handlers' cancel and the unsubscribe
            reply = await nc.request(subject, b'{"prompt": "x"}', timeout=5)
            actor.stop()
    headers = reply.headers or {}
    assert headers.get("Nats-Service-Error-Code") == "503"
    assert "stopped before this request started" in headers.get("Nats-Service-Error", "")
    assert "Vapora-Outcome" not in headers  # it never ran


async def test_a_503_refusal_frees_no_slot_and_concurrency_stays_bounded(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.bounded"
    running, peak = 0, 0
    release = anyio.Event()

    async def hold(request: CompletionRequest, context: RequestContext) -> Echo:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return Echo(text="", count=0)

    actor = one_endpoint(nc, f"bounded-{unique}", subject, hold, max_concurrency=2, max_backlog=2)
    codes: list[str] = []

    async def one() -> None:
        reply = await nc.request(subject, b'{"prompt": "x"}', timeout=10)
        codes.append((reply.headers or {}).get("Nats-Service-Error-Code", "ok"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            async with anyio.create_task_group() as senders:
                for _ in range(4):  # two running, two waiting in the backlog
                    senders.start_soon(one)
                while actor.in_flight < 4:  # noqa: ASYNC110 - polls the actor's counter
                    await anyio.sleep(0.01)
                for _ in range(3):  # each refused, one after the other's refusal has gone out
                    await one()
                assert codes == ["503"] * 3
                release.set()
            actor.stop()
    assert sorted(codes) == ["503"] * 3 + ["ok"] * 4
    assert peak == 2


async def test_each_request_past_its_endpoints_timeout_gets_504_while_quick_ones_are_answered(
    nc: NATS, unique: str
) -> None:
    """Requests started at different times, on endpoints with different timeouts: every stuck
    one is cancelled and answered 504 in turn, every quick one between them is answered."""
    released = anyio.Event()
    started: list[str] = []

    async def stuck(request: CompletionRequest, context: RequestContext) -> Echo:
        started.append(request.prompt or "")
        if request.prompt == "stuck":
            await anyio.sleep(30)
        if request.prompt == "held":
            await released.wait()
        return Echo(text=request.prompt or "", count=0)

    # Deadlines long enough that every request has started before the first passes, on a
    # loaded machine too (the held ones are released only then).
    subjects = {timeout: f"t{unique}.timeout{i}" for i, timeout in enumerate((1.0, 2.0))}
    actor = ActorService(
        nc,
        name=f"timeouts-{unique}",
        endpoints=[
            Endpoint(
                name=f"e{i}",
                subject=subject,
                request_type=CompletionRequest,
                handler=stuck,
                timeout=timeout,
            )
            for i, (timeout, subject) in enumerate(subjects.items())
        ],
    )
    answers: list[tuple[str, str]] = []

    async def one(subject: str, prompt: str) -> None:
        headers, data = await ask(nc, subject, json.dumps({"prompt": prompt}).encode())
        code = headers.get("Nats-Service-Error-Code")
        answers.append((prompt, code or json.loads(data)["text"]))

    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as senders:
                for n, subject in enumerate(subjects.values(), start=1):
                    senders.start_soon(one, subject, "held")  # the first deadline of each
                    while started.count("held") < n:  # noqa: ASYNC110 - the handler's list
                        await anyio.sleep(0.005)
                    senders.start_soon(one, subject, "stuck")
                    senders.start_soon(one, subject, "quick")
                while started.count("stuck") < 2 or started.count("quick") < 2:  # noqa: ASYNC110
                    await anyio.sleep(0.005)
                released.set()  # the held ones finish before their deadlines, the stuck don't
        assert sorted(answers) == sorted(
            [("held", "held"), ("quick", "quick"), ("stuck", "504")] * 2
        )
        assert actor.in_flight == 0
        actor.stop()


async def test_a_shielded_step_past_the_endpoint_timeout_finishes_then_the_request_gets_504(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.shielded"
    steps: list[str] = []

    async def slow_step(request: CompletionRequest, context: RequestContext) -> Echo:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.4)  # outlives the endpoint's timeout, yet must complete
            steps.append("shielded")
        await anyio.sleep(30)
        steps.append("never")
        return Echo(text="", count=0)

    actor = ActorService(
        nc,
        name=f"shielded-{unique}",
        endpoints=[
            Endpoint(
                name="e",
                subject=subject,
                request_type=CompletionRequest,
                handler=slow_step,
                timeout=0.1,
            )
        ],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        with anyio.fail_after(5):
            headers, data = await ask(nc, subject, b'{"prompt": "x"}')
        assert headers["Nats-Service-Error-Code"] == "504"
        assert decode(data, ErrorReply).error.code == "timeout"
        assert steps == ["shielded"]
        actor.stop()


async def test_cancelling_run_cancels_the_handlers_it_runs_and_waits_for_their_shielded_steps(
    nc: NATS, unique: str
) -> None:
    subject = f"t{unique}.cancelled"
    steps: list[str] = []
    entered = anyio.Event()

    async def hangs(request: CompletionRequest, context: RequestContext) -> Echo:
        if request.prompt == "shielded":
            with anyio.CancelScope(shield=True):
                entered.set()
                await anyio.sleep(0.3)
                steps.append("shielded")
        await anyio.sleep(30)
        steps.append("never")
        return Echo(text="", count=0)

    actor = one_endpoint(nc, f"cancelled-{unique}", subject, hangs)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            for prompt in ("plain", "shielded", "plain"):
                await nc.publish(subject, json.dumps({"prompt": prompt}).encode())
            await entered.wait()
            while actor.in_flight < 3:  # noqa: ASYNC110 - polls the actor's counter
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # run() itself is cancelled: no stop(), no drain
    assert steps == ["shielded"]
    assert actor.in_flight == 0


async def test_requests_still_waiting_when_the_drain_ends_are_answered_503_at_once(
    nc: NATS, unique: str
) -> None:
    """Past the drain deadline, a request that never left the backlog is refused with 503
    ``overloaded`` (it did not run: its sender may send it elsewhere), not left to time out."""
    subject = f"t{unique}.late"
    never = anyio.Event()

    async def hold(request: CompletionRequest, context: RequestContext) -> Echo:
        await never.wait()
        return Echo(text="", count=0)

    actor = one_endpoint(nc, f"late-{unique}", subject, hold, max_concurrency=1, drain_timeout=0.2)
    replies: dict[str, Msg | BaseException] = {}

    async def one(prompt: str) -> None:
        body = json.dumps({"prompt": prompt}).encode()
        try:
            replies[prompt] = await nc.request(subject, body, timeout=30)
        except Exception as exc:  # the running one: cancelled by the drain, no reply
            replies[prompt] = exc

    with anyio.fail_after(10):  # far less than the requests' own 30 s
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(one, "running")
            while actor.in_flight < 1:  # noqa: ASYNC110 - polls the actor's counter
                await anyio.sleep(0.01)
            tg.start_soon(one, "waiting")
            while actor.in_flight < 2:  # noqa: ASYNC110 - polls the actor's counter
                await anyio.sleep(0.01)
            actor.stop()
            while "waiting" not in replies:  # noqa: ASYNC110 - set by the request's task
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # the running one gets no reply: not waited for
    waiting = replies["waiting"]
    assert isinstance(waiting, Msg)
    assert (waiting.headers or {}).get("Nats-Service-Error-Code") == "503"
    assert json.loads(waiting.data)["error"]["code"] == "overloaded"
    assert "stopped before this request started" in json.loads(waiting.data)["error"]["message"]


async def test_a_reply_larger_than_the_server_carries_is_answered_with_an_error_that_says_so(
    nc: NATS, unique: str
) -> None:
    # Published, it raised in the actor and nobody was answered: the caller waited out its
    # timeout while what the handler did (a billed call) was done.
    async def huge(request: CompletionRequest, context: RequestContext) -> bytes:
        return b'"' + b"x" * nc.max_payload + b'"'

    subject = f"t{unique}.huge"
    actor = one_endpoint(nc, f"huge-{unique}", subject, huge)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        headers, data = await ask(nc, subject, b'{"prompt": "hi"}')
        actor.stop()
    assert headers["Nats-Service-Error-Code"] == "500"
    message = decode(data, ErrorReply).error.message
    assert "more than the NATS server carries" in message and str(nc.max_payload) in message
