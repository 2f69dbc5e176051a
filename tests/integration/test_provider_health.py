"""The provider actor appends ``provider_health_changed`` only when availability changes: none
after the usual successful call, one as soon as a failure opens the breaker (DESIGN §2)."""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from actors.provider import ProviderActor
from events import subjects
from events.codec import encode
from events.contract import ProviderCall, TaskType
from events.log import CallFailed, ProviderHealthChanged, SpendRecorded
from tests.fault.provider_harness import Deployment, config_text, deployment, until
from tests.samples import EVENTS
from vapora.config import parse_config
from vapora.errors import InternalError

pytestmark = pytest.mark.anyio


def held_files(directory: Path) -> list[Path]:
    return list(directory.glob("held-provider-openai-*.jsonl"))


async def test_health_is_appended_on_changes_only(tmp_path: Path) -> None:
    options = {"breaker_threshold": 1, "breaker_cooldown_s": 60.0, "health_interval_s": 3600.0}
    async with deployment(tmp_path, config_text, provider_options=options) as dep:

        async def health() -> list[ProviderHealthChanged]:
            events = await dep.events()
            return [e for e in events if isinstance(e, ProviderHealthChanged)]

        async def openai_states() -> list[tuple[bool, str]]:
            return [(e.available, e.breaker) for e in await health() if e.provider == "openai"]

        for _ in range(20):
            await dep.client.complete(prompt="hello", provider="openai")
        assert await openai_states() == [(True, "closed")]  # announced at start, then nothing
        dep.sim.control({"provider": "openai", "fail_next": 1, "fail_with": "error-500"})
        with pytest.raises(Exception):  # noqa: B017 - an override has no fallback
            await dep.client.complete(prompt="hello", provider="openai")
        with anyio.fail_after(10):
            while True:
                if await openai_states() == [(True, "closed"), (False, "open")]:
                    break
                await anyio.sleep(0.02)
        router = dep.router
        assert router is not None
        await until(lambda: router.views["openai"].breaker_open)


async def test_a_health_change_the_log_did_not_take_is_published_again(tmp_path: Path) -> None:
    """The breaker opens while the event log refuses appends: the change is not stored, so the
    next health check publishes it again (it used to count as published, and the routers went
    on routing to a provider they would never hear had failed)."""
    options = {"breaker_threshold": 1, "breaker_cooldown_s": 60.0, "health_interval_s": 3600.0}
    async with deployment(tmp_path, config_text, provider_options=options) as dep:
        provider = dep.providers["openai"]
        append_many = dep.log.append_many
        refused: list[ProviderHealthChanged] = []

        async def log_down(events: Any, **kw: Any) -> Any:
            if any(isinstance(e, ProviderHealthChanged) for e in events):
                refused.extend(e for e in events if isinstance(e, ProviderHealthChanged))
                raise InternalError("event log did not acknowledge event within 30.0 s")
            return await append_many(events, **kw)

        dep.log.append_many = log_down  # type: ignore[method-assign]
        dep.sim.control({"provider": "openai", "fail_next": 1, "fail_with": "error-500"})
        with pytest.raises(Exception):  # noqa: B017 - an override has no fallback
            await dep.client.complete(prompt="hello", provider="openai")
        with anyio.fail_after(10):
            while not refused:  # noqa: ASYNC110 - the breaker's change, refused by the log
                await anyio.sleep(0.02)
        assert (refused[0].available, refused[0].breaker) == (False, "open")
        dep.log.append_many = append_many  # type: ignore[method-assign]
        await provider._publish_health()  # the next check, with the log back
        states = [
            (e.available, e.breaker)
            for e in await dep.events()
            if isinstance(e, ProviderHealthChanged) and e.provider == "openai"
        ]
        assert states == [(True, "closed"), (False, "open")]


async def test_a_stopping_provider_actor_waits_for_its_calls_to_end_and_be_billed(
    tmp_path: Path,
) -> None:
    """A stop drains the actor's calls in flight; each may take the provider's whole timeout,
    and its spend is appended after it: a drain shorter than that cancelled calls whose cost then
    never reached the log (the default drain was 10 s against a 30 s timeout)."""
    async with deployment(tmp_path, config_text) as dep:
        for name, provider in dep.providers.items():
            timeout_s = provider.config.timeout_ms / 1000
            assert provider.service.drain_timeout >= timeout_s + 5.0, name


def _outage(dep: Deployment) -> list[bool]:
    """The event log refuses calls' spend (an outage past the acknowledgement timeout) while
    the returned switch's one value is True."""
    append_many = dep.log.append_many
    down = [True]

    async def outage(events: Any, **kw: Any) -> Any:
        if down[0] and any(isinstance(e, SpendRecorded) for e in events):
            raise InternalError("event log did not acknowledge event within 30.0 s")
        return await append_many(events, **kw)

    dep.log.append_many = outage  # type: ignore[method-assign]
    return down


async def test_a_calls_spend_the_log_did_not_take_is_appended_once_it_does(
    tmp_path: Path,
) -> None:
    """The event log refuses appends for a while (an outage past the acknowledgement timeout):
    the call's events are held back and appended again until the log takes them, so the spend
    reaches the log once (it was logged and dropped)."""
    async with deployment(tmp_path, config_text) as dep:
        provider = dep.providers["openai"]
        provider.held_retry_s = 0.05
        down = _outage(dep)
        result = await dep.client.complete(prompt="hello", provider="openai", task_id="T-held")
        assert provider.held  # the call answered; its events wait
        down[0] = False
        await until(lambda: not provider.held)
        spends = [
            e for e in await dep.events() if isinstance(e, SpendRecorded) and e.task_id == "T-held"
        ]
        assert [s.cost_usd for s in spends] == [result.cost_usd]


async def test_held_events_appended_later_continue_their_tasks_trace(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """Held events were appended again in the held loop's own context: a new trace of their
    own, so the call's trace ended at the failed append and the ledger's processing of the
    spend joined another. Each is held with its call's trace context, written into its line
    (so another instance adopting the file after a crash continues it too)."""
    async with deployment(tmp_path, config_text) as dep:
        provider = dep.providers["openai"]
        provider.held_retry_s = 0.05
        down = _outage(dep)
        await dep.client.complete(prompt="hello", provider="openai", task_id="T-traced")
        assert provider.held
        [line] = [p.read_bytes() for p in held_files(tmp_path)]
        assert b'"held_trace":{"traceparent":"00-' in line
        [call] = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
        assert call.context is not None
        recovered = time.time_ns()
        down[0] = False
        await until(lambda: not provider.held)
    later = [
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and (s.start_time or 0) > recovered
    ]
    assert later, "the held events were appended under no span"
    assert {s.context.trace_id for s in later if s.context} == {call.context.trace_id}


async def test_events_held_at_a_stop_are_kept_and_appended_at_the_next_start(
    tmp_path: Path,
) -> None:
    """Held events are on disk as soon as they are held, in a file of the instance's own that
    another instance leaves alone while the first lives; after a stop (the log still away) the
    next start adopts them and appends them before it serves."""
    async with deployment(tmp_path, config_text) as dep:
        provider = dep.providers["openai"]
        append_many = dep.log.append_many
        spend = EVENTS["spend_recorded"]

        async def refused(events: Any, **kw: Any) -> Any:
            raise InternalError("event log did not acknowledge event within 30.0 s")

        dep.log.append_many = refused  # type: ignore[method-assign]
        assert not await provider._append([spend], hold=True)
        path = provider.held.path
        assert path.read_bytes() == encode(spend) + b"\n"  # on disk before the stop
        dep.log.append_many = append_many  # type: ignore[method-assign]
        other = ProviderActor(dep.runtime, provider="openai")
        await other._load_held()
        assert not other.held and path.exists()  # a live instance's file is left alone
        provider.held.close()  # what a stop does once its last try failed
        cut = b'{"type":"spend_recorded","id":"cut\n'  # a line a crash cut short
        with path.open("ab") as out:
            out.write(cut)
        await other._load_held()
        assert not path.exists() and not other.held
        assert not held_files(tmp_path)
        stored = [e for e in await dep.events() if e.id == spend.id]
        assert stored == [spend]
        unreadable = tmp_path / "held-provider-openai.unreadable"
        assert unreadable.read_bytes() == cut  # kept aside, not a crash
        other.held.close()


async def test_a_file_from_an_earlier_version_is_adopted(tmp_path: Path) -> None:
    """``held-<actor>.jsonl``, what earlier versions wrote at a stop, is adopted too, another
    provider's as well (any provider actor adopts what a dead one held), and nothing of an
    actor of another kind."""
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        spend = EVENTS["spend_recorded"]
        other = msgspec.structs.replace(spend, id="spend-of-openai2")
        (tmp_path / "held-provider-openai.jsonl").write_bytes(encode(spend) + b"\n")
        (tmp_path / "held-provider-openai2.jsonl").write_bytes(encode(other) + b"\n")
        (tmp_path / "held-router.jsonl").write_bytes(b"another kind of actor's\n")
        actor = ProviderActor(dep.runtime, provider="openai")
        await actor._load_held()
        assert not actor.held
        assert not (tmp_path / "held-provider-openai.jsonl").exists()
        assert not (tmp_path / "held-provider-openai2.jsonl").exists()
        assert (tmp_path / "held-router.jsonl").exists()  # not a provider actor's
        appended = {e.id for e in await dep.events()}
        assert {spend.id, other.id} <= appended
        actor.held.close()


def slow_openai(base_url: str) -> str:
    return config_text(base_url, models={"openai": "gpt-4-slow-5000"})


async def _call_openai(dep: Any, task_id: str) -> None:
    call = ProviderCall(
        task_id=task_id,
        task_type=TaskType.GENERAL_QUERY,
        attempt=1,
        model=dep.runtime.config.provider("openai").model,
        prompt="hello",
        max_tokens=16,
    )
    await dep.nc.request(subjects.provider_call("openai"), encode(call), timeout=30)


async def test_a_call_cut_by_a_stop_is_recorded_as_cancelled(tmp_path: Path) -> None:
    """A provider actor cancelled while the provider has a call (a second stop signal): the
    call is recorded as ``call_failed`` of class ``cancelled``, appended by the stop's last
    try (it used to leave no trace in the log at all), with a spend at the attempt's upper
    bound (it had none: its reservation expired and the budget was freed of money the provider
    may have taken)."""
    async with deployment(tmp_path, slow_openai, providers=[], router=False) as dep:
        actor = ProviderActor(dep.runtime, provider="openai")
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(_call_openai, dep, "T-cut")
            await until(lambda: actor.service.in_flight > 0)
            await anyio.sleep(0.2)  # the request is with the provider (5 s to answer)
            tg.cancel_scope.cancel()
        events = await dep.events_of("T-cut")
        [cut] = [e for e in events if isinstance(e, CallFailed)]
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert (cut.error_class, cut.error_code) == ("cancelled", "cancelled")
        assert "unknown" in cut.message and "upper bound" in cut.message
        assert cut.latency_ms >= 200
        # "hello" and 16 output tokens, at gpt-4's $30 / $60 a million: the bound, not 0
        assert cut.usage is not None and cut.usage.output_tokens == 16
        assert spend.cost_usd == cut.cost_usd > 0 and spend.output_tokens == 16
        assert not held_files(tmp_path)


async def test_a_cut_call_the_held_file_refuses_stays_in_the_write_ahead_file(
    tmp_path: Path,
) -> None:
    # Its held copy in memory only (the disk refused it), the cut call was still said done in
    # the write-ahead file: a kill then left its spend in neither.
    from actors.held import HeldEvents

    async with deployment(tmp_path, slow_openai, providers=[], router=False) as dep:
        actor = ProviderActor(dep.runtime, provider="openai")
        actor.held.hold = lambda events, traces=None: False  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(_call_openai, dep, "T-cut-refused")
            await until(lambda: actor.service.in_flight > 0)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        adopter = HeldEvents(tmp_path, "provider-openai")
        assert adopter.adopt() == 2  # the call at its bound, for the next start to append
        assert {type(e) for e in adopter} == {CallFailed, SpendRecorded}
        assert all(getattr(e, "task_id", None) == "T-cut-refused" for e in adopter)
        adopter.close()


async def test_a_calls_events_cut_before_the_log_answered_are_held(tmp_path: Path) -> None:
    """A stop cancels the append of a call's events while JetStream has not answered: the
    events are held (on disk) and appended by the stop's last try, not dropped."""
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        actor = ProviderActor(dep.runtime, provider="openai")
        append_many = dep.log.append_many
        waiting = anyio.Event()

        async def unanswered(events: Any, **kw: Any) -> Any:
            if any(isinstance(e, SpendRecorded) for e in events):
                waiting.set()
                await anyio.sleep_forever()
            return await append_many(events, **kw)

        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            dep.log.append_many = unanswered  # type: ignore[method-assign]
            tg.start_soon(_call_openai, dep, "T-unanswered")
            await waiting.wait()
            assert held_files(tmp_path) == []
            dep.log.append_many = append_many  # type: ignore[method-assign]
            tg.cancel_scope.cancel()
        spends = [e for e in await dep.events_of("T-unanswered") if isinstance(e, SpendRecorded)]
        assert len(spends) == 1 and spends[0].cost_usd > 0
        assert not held_files(tmp_path)


@pytest.mark.parametrize("stream_to", ["vapora.events.route", "a b", "_INBOX.>"])
async def test_a_stream_to_no_chunk_may_go_to_is_refused_before_the_call(
    tmp_path: Path, stream_to: str
) -> None:
    """A stream's chunks go to ``stream_to``: under the event log's subjects they were stored as
    events no reader could decode; a malformed one failed after the provider was paid for."""
    async with deployment(tmp_path, config_text, providers=["openai"], router=False) as dep:
        call = ProviderCall(
            task_id="T-stream-to",
            task_type=TaskType.GENERAL_QUERY,
            attempt=1,
            model=dep.runtime.config.provider("openai").model,  # type: ignore[union-attr]
            prompt="hello",
            stream_to=stream_to,
        )
        reply = await dep.nc.request(subjects.provider_call("openai"), encode(call), timeout=10)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "400"
        assert "`stream_to`" in reply.headers["Nats-Service-Error"]
        assert await dep.events_of("T-stream-to") == []


async def test_a_call_that_fails_inside_vapora_is_recorded(tmp_path: Path) -> None:
    """An exception of ours during the call (not a provider error): the call may have been
    billed, and nothing recorded it."""
    async with deployment(tmp_path, config_text, providers=["openai"], router=False) as dep:
        actor = dep.providers["openai"]

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug mid-call")

        actor.client.complete = broken  # type: ignore[method-assign]
        call = ProviderCall(
            task_id="T-bug",
            task_type=TaskType.GENERAL_QUERY,
            attempt=1,
            model=actor.config.model,
            prompt="hello",
        )
        reply = await dep.nc.request(subjects.provider_call("openai"), encode(call), timeout=10)
        assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "500"
        events = await dep.events_of("T-bug")
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        [spend] = [e for e in events if isinstance(e, SpendRecorded)]
        assert failed.error_class == "internal" and failed.cost_usd == spend.cost_usd > 0
        assert "RuntimeError" in failed.message and "a bug mid-call" not in failed.message
        assert "upper bound" in failed.message


async def test_a_call_is_priced_at_its_time_not_when_the_config_was_loaded(
    tmp_path: Path,
) -> None:
    """DESIGN §4: "the price in force at the call's time". genai-prices doubles
    gemini-3.6-flash on 2027-01-01; a config loaded the minute before priced the call after it
    at the old price, and the audit, replaying the recorded price, could not tell."""
    from datetime import UTC, datetime

    def gemini_36(base_url: str) -> str:  # priced by the genai-prices table, not the file
        return (
            '[[providers]]\nname = "gemini"\nkind = "gemini"\nmodel = "gemini-3.6-flash"\n'
            f'base_url = "{base_url}"\napi_key_env = "GOOGLE_API_KEY"\n'
        )

    async with deployment(tmp_path, gemini_36, providers=[], router=False) as dep:
        loaded = parse_config(
            gemini_36(dep.sim.base_url),
            source="t.toml",
            at=datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
        )
        assert loaded.provider("gemini").price.input_per_mtok == Decimal("0.75")  # type: ignore[union-attr]
        after = datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
        runtime = dataclasses.replace(dep.runtime, config=loaded, clock=lambda: after)
        actor = ProviderActor(runtime, provider="gemini")
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            call = ProviderCall(
                task_id="T-priced",
                task_type=TaskType.GENERAL_QUERY,
                attempt=1,
                model="gemini-3.6-flash",
                prompt="hello",
            )
            await dep.nc.request(subjects.provider_call("gemini"), encode(call), timeout=10)
            [spent] = [e for e in await dep.events_of("T-priced") if isinstance(e, SpendRecorded)]
            assert spent.price.input_per_mtok == Decimal("1.5")
            actor.stop()


async def test_a_call_keeps_the_price_it_started_with_while_others_start(tmp_path: Path) -> None:
    """The price was the client's, set by each call as it started: a slow call that began
    before a price change was recorded at the price of a call that began after it."""
    from datetime import UTC, datetime

    def gemini_36(base_url: str) -> str:
        return (
            '[[providers]]\nname = "gemini"\nkind = "gemini"\nmodel = "gemini-3.6-flash"\n'
            f'base_url = "{base_url}"\napi_key_env = "GOOGLE_API_KEY"\n'
        )

    async with deployment(tmp_path, gemini_36, providers=[], router=False) as dep:
        before = datetime(2026, 12, 31, 23, 59, 50, tzinfo=UTC)
        now = [before]
        loaded = parse_config(gemini_36(dep.sim.base_url), source="t.toml", at=before)
        runtime = dataclasses.replace(dep.runtime, config=loaded, clock=lambda: now[0])
        actor = ProviderActor(runtime, provider="gemini")

        async def call(task_id: str, model: str) -> None:
            ask = ProviderCall(
                task_id=task_id,
                task_type=TaskType.GENERAL_QUERY,
                attempt=1,
                model=model,
                prompt="hello",
            )
            await dep.nc.request(subjects.provider_call("gemini"), encode(ask), timeout=10)

        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            tg.start_soon(call, "T-slow", "gemini-3.6-flash-slow-1000")
            await until(lambda: actor.service.in_flight > 0)
            now[0] = datetime(2027, 1, 1, 0, 0, 10, tzinfo=UTC)  # the price doubles
            await call("T-after", "gemini-3.6-flash")
            await until(lambda: actor.service.in_flight == 0, within_s=10)
            prices = {}
            for task_id in ("T-slow", "T-after"):
                [spent] = [e for e in await dep.events_of(task_id) if isinstance(e, SpendRecorded)]
                prices[task_id] = spent.price.input_per_mtok
            assert prices == {"T-slow": Decimal("0.75"), "T-after": Decimal("1.5")}
            actor.stop()


async def test_a_running_instance_adopts_what_a_dead_sibling_held(tmp_path: Path) -> None:
    """Two instances of a provider share a data directory and one dies holding spend: the files
    were adopted only at a start, so with the sibling living on, that spend stayed out of the
    log (and the keeper expired its holds) until some instance started again."""
    from actors.held import HeldEvents

    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        spend = EVENTS["spend_recorded"]
        actor = ProviderActor(dep.runtime, provider="openai")
        actor.held_retry_s, actor.adopt_every = 0.05, 1
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)  # started (and done adopting at start) before it died
            dead = HeldEvents(tmp_path, "provider-openai")
            assert dead.hold([spend])
            dead.close()  # what a SIGKILL leaves: the file, its lock gone with the process
            await until(lambda: not held_files(tmp_path), within_s=10)
            assert [e for e in await dep.events() if e.id == spend.id] == [spend]
            actor.stop()


def claude_inflight(directory: Path) -> list[Path]:
    return list(directory.glob("inflight-provider-claude-*.jsonl"))


async def test_an_instance_of_another_provider_adopts_what_a_dead_one_held(
    tmp_path: Path,
) -> None:
    """The only claude instance died holding a call's spend (its write-ahead): only a claude
    instance adopted it, so with none started again the spend stayed out of the log, the
    keeper expired the call's hold after two minutes, and the day's limit was overspent by
    50 % by the time claude came back. A live instance of any provider adopts it now."""
    from actors.held import HeldEvents

    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        spend = EVENTS["spend_recorded"]
        actor = ProviderActor(dep.runtime, provider="openai")
        actor.held_retry_s, actor.adopt_every = 0.05, 1
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            dead = HeldEvents(tmp_path, "provider-claude")
            dead.begin([spend])  # written ahead of a call the provider has
            dead.close()  # what a SIGKILL leaves: the file, its lock gone with the process
            assert claude_inflight(tmp_path)
            await until(lambda: not claude_inflight(tmp_path), within_s=10)
            for _ in range(100):
                if any(e.id == spend.id for e in await dep.events()):
                    break
                await anyio.sleep(0.1)
            else:
                pytest.fail("the dead claude instance's spend never reached the log")
            actor.stop()


async def test_one_instance_without_the_key_does_not_take_the_provider_from_every_router(
    tmp_path: Path,
) -> None:
    """A second claude provider actor started without ANTHROPIC_API_KEY said so in a health
    event; the routers took it as the provider's, and every later claude request was a 503
    ("ANTHROPIC_API_KEY is not set") while the first instance, with its key, still served,
    even after the keyless one stopped. Each instance now speaks for itself: the provider
    lacks its key only when every instance heard from lately said so; a router that starts
    reads the instances' recent health events, not the provider's last one alone; an instance
    that stops says so, and is forgotten."""
    import dataclasses

    from actors.provider import ProviderActor
    from actors.router import RouterActor
    from events.log import ProviderHealthChanged
    from tests.fault.provider_harness import KEYS, config_text, deployment, until

    def config(base_url: str) -> str:
        return config_text(base_url)

    async with deployment(tmp_path, config) as dep:
        router = dep.router
        assert router is not None
        keyless_env = {k: v for k, v in KEYS.items() if k != "ANTHROPIC_API_KEY"}

        def keyless_claude() -> ProviderActor:
            return ProviderActor(
                dataclasses.replace(dep.runtime, env=keyless_env), provider="claude"
            )

        async def heard(instance: str, router: RouterActor) -> None:
            with anyio.fail_after(5):  # its health event in the log, and past the router

                async def said() -> bool:
                    return any(
                        isinstance(e, ProviderHealthChanged) and e.instance == instance
                        for e in await dep.events()
                    )

                while not await said():  # noqa: ASYNC110 - the log is polled: nothing to await
                    await anyio.sleep(0.02)
                await until(lambda: instance in router._instances.get("claude", {}))

        keyless = keyless_claude()
        async with anyio.create_task_group() as tg:
            await tg.start(keyless.run)
            await heard(keyless.instance, router)
            assert router.views["claude"].api_key_present
            # It takes no calls either (the queue group handed it a share, each failing): every
            # call goes to the instance with the key, and it still answers $SRV.PING.
            for _ in range(8):
                result = await dep.client.complete(prompt="hello", provider="claude")
                assert result.provider == "claude" and len(result.attempts) == 1
            pings = await dep.nc.request("$SRV.PING.provider-claude", b"", timeout=2)
            assert pings.data
            # A router that starts now reads both instances' words (the last health event,
            # the keyless one's, alone took the provider away).
            fresh = RouterActor(dep.runtime)
            async with anyio.create_task_group() as inner:
                await inner.start(fresh.run)
                assert fresh.views["claude"].api_key_present
                fresh.stop()
            keyless.stop()
        # The keyed instance stops, saying so, and a keyless one comes: the key is missing.
        dep.providers["claude"].stop()
        alone = keyless_claude()
        async with anyio.create_task_group() as tg:
            await tg.start(alone.run)
            await until(lambda: not router.views["claude"].api_key_present)
            alone.stop()


async def test_an_instance_repeats_its_health_and_one_not_heard_from_is_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instance says its health again every HEALTH_HEARTBEAT_S though nothing changed, so
    a router can forget one it has not heard from in INSTANCE_FORGOTTEN_S (killed, it could not
    say it stopped): its last word no longer stands for the provider."""
    from datetime import UTC, datetime, timedelta

    import actors.provider as provider_module
    from events.log import INSTANCE_FORGOTTEN_S, ProviderHealthChanged
    from tests.fault.provider_harness import config_text, deployment

    monkeypatch.setattr(provider_module, "HEALTH_HEARTBEAT_S", 0.2)
    async with deployment(
        tmp_path,
        lambda url: config_text(url),
        providers=["claude"],
        provider_options={"health_interval_s": 0.05},
    ) as dep:
        instance = dep.providers["claude"].instance
        with anyio.fail_after(5):
            while True:
                said = [
                    e
                    for e in await dep.events()
                    if isinstance(e, ProviderHealthChanged) and e.instance == instance
                ]
                if len(said) >= 3:
                    break
                await anyio.sleep(0.05)
        assert {(e.available, e.reason) for e in said} == {(True, "available")}  # said again

        router = dep.router
        assert router is not None
        then = datetime.now(UTC)

        def word(name: str, at: datetime, has_key: bool) -> ProviderHealthChanged:
            return ProviderHealthChanged(
                id=f"{name}-{at.timestamp()}",
                at=at,
                provider="openai",
                available=has_key,
                reason="" if has_key else "OPENAI_API_KEY is not set",
                instance=name,
            )

        heard = [1000.0]  # the router's own clock (the instances' clocks may disagree)
        router._clock = lambda: heard[0]
        router._apply(word("keyed", then, True))
        heard[0] += 60
        router._apply(word("keyless", then - timedelta(hours=3), False))  # a clock behind
        assert router.views["openai"].api_key_present  # the keyed one was heard lately
        heard[0] += INSTANCE_FORGOTTEN_S
        router._apply(word("keyless", then + timedelta(hours=3), False))  # or ahead
        assert not router.views["openai"].api_key_present  # the keyed one is forgotten


async def test_each_instances_breaker_and_limit_count_for_the_provider_as_the_calls_go(
    tmp_path: Path,
) -> None:
    """The provider's view was the last word of any instance: a sibling's routine health (its
    10-minute repeat) erased another's rate limit from every router, and an instance that
    stopped left its open breaker standing. Now a rate limit (the key's, shared) stands while
    any instance that has it said so lately, a breaker closes the provider off only when every
    instance's is open, and an instance that stopped no longer counts."""
    from datetime import UTC, datetime, timedelta

    from events.log import INSTANCE_STOPPED, ProviderHealthChanged
    from tests.fault.provider_harness import config_text, deployment

    async with deployment(tmp_path, lambda url: config_text(url), providers=[]) as dep:
        router = dep.router
        assert router is not None
        t0 = datetime.now(UTC)
        until = t0 + timedelta(seconds=120)

        def word(name: str, seconds: float, **kw: object) -> None:
            fields: dict[str, object] = {"available": True, "reason": "available"}
            fields.update(kw)
            at = t0 + timedelta(seconds=seconds)
            router._apply(
                ProviderHealthChanged(
                    id=f"{name}-{seconds}",
                    at=at,
                    provider="openai",
                    instance=name,
                    **fields,  # type: ignore[arg-type]
                )
            )

        word("a", 0)
        word("b", 1, available=False, reason="rate limited", rate_limited_until=until)
        assert router.views["openai"].rate_limited_until == until
        word("a", 2)  # a's repeat: b's limit stands
        assert router.views["openai"].rate_limited_until == until
        word("b", 3, reason=INSTANCE_STOPPED)  # b leaves
        assert router.views["openai"].rate_limited_until is None

        word("c", 4, available=False, reason="circuit breaker open", breaker="open")
        assert not router.views["openai"].breaker_open  # a still takes calls
        word("a", 5, available=False, reason="circuit breaker open", breaker="open")
        assert router.views["openai"].breaker_open  # every instance's is open
        word("c", 6, reason=INSTANCE_STOPPED)
        assert router.views["openai"].breaker_open  # a's still is
        word("a", 7, reason=INSTANCE_STOPPED)  # none left: as before any word
        view = router.views["openai"]
        assert not view.breaker_open and view.healthy and view.api_key_present
        # One instance whose clock jumped ahead, then back: its last word still decides.
        word("d", 3600, available=True)
        word("d", 8, available=False, reason="circuit breaker open", breaker="open")
        assert router.views["openai"].breaker_open


async def test_a_failing_health_check_names_the_server_it_asked(tmp_path: Path) -> None:
    # "ollama: health check failing: health check failed" said nothing an operator could act
    # on: which server did not answer.
    def nowhere(base_url: str) -> str:
        return config_text(base_url).replace(base_url, "http://127.0.0.1:9")

    async with deployment(tmp_path, nowhere, providers=["ollama"], router=False) as dep:
        actor = dep.providers["ollama"]
        await actor._check_health()
        assert actor._healthy == (
            False,
            "health check failed: no healthy answer from http://127.0.0.1:9",
        )


async def test_events_the_disk_would_not_hold_stay_on_their_way_in_the_write_ahead_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log refused them and the held file could not be written: they were marked done in
    # the write-ahead file, its only copy on disk, so a kill then lost the spend.
    async with deployment(tmp_path, config_text, providers=["openai"], router=False) as dep:
        actor = dep.providers["openai"]
        spend = EVENTS["spend_recorded"]

        async def refused(*args: Any, **kw: Any) -> Any:
            raise InternalError("the log is away")

        monkeypatch.setattr(actor.runtime.log, "append_many", refused)
        monkeypatch.setattr(actor.held, "hold", lambda *args, **kw: False)
        assert not await actor._append([spend], hold=True)
        assert spend.id in actor.held._pending
