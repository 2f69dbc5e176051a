"""A provider actor killed (SIGKILL) while the event log refuses its call's events: the events
were on disk from the moment they were held, and the next provider actor on that data directory
appends them. Real nats-server (the refusal is a full stream's), simulator over HTTP, a real OS
process killed."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.js.api import DiscardPolicy

from actors.provider import ProviderActor
from events import subjects
from events.codec import decode, encode
from events.contract import ProviderCall, ProviderCallResult, TaskType
from events.log import CallFailed, CallSucceeded, Event, SpendRecorded
from tests.fault.provider_harness import KEYS, config_text, deployment, until
from tests.fault.provider_process import started

pytestmark = pytest.mark.anyio


def held_files(data_dir: Path) -> list[Path]:
    """The provider actor instances' held-events files for ``openai`` in ``data_dir``."""
    return list(data_dir.glob("held-provider-openai-*.jsonl"))


def inflight_files(data_dir: Path) -> list[Path]:
    """Their write-ahead files."""
    return list(data_dir.glob("inflight-provider-openai-*.jsonl"))


def _call(task_id: str, model: str = "gpt-4o-mini", **fields: Any) -> bytes:
    """An encoded call for the openai provider actor."""
    call = ProviderCall(
        task_id=task_id,
        task_type=TaskType.GENERAL_QUERY,
        attempt=fields.pop("attempt", 1),
        model=model,
        prompt=fields.pop("prompt", "hello"),
        max_tokens=16,
        **fields,
    )
    return encode(call)


def _kill(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGKILL)
    worker.wait()


@contextlib.asynccontextmanager
async def _successor(dep: Any, data_dir: Path) -> AsyncIterator[None]:
    """A provider actor on the killed worker's data directory: its start adopts the worker's
    files and appends what they hold; stopped on exit."""
    runtime = dataclasses.replace(dep.runtime, data_dir=data_dir)
    successor = ProviderActor(runtime, provider="openai")
    async with anyio.create_task_group() as tg:
        await tg.start(successor.run)
        yield
        successor.stop()


async def _events_once(
    dep: Any, task_id: str, enough: Callable[[list[Event]], bool]
) -> list[Event]:
    """The log's events of ``task_id``, once ``enough`` says they are (within 15 s)."""
    with anyio.fail_after(15):
        while True:
            events: list[Event] = await dep.events_of(task_id)
            if enough(events):
                return events
            await anyio.sleep(0.05)


def _spends(events: list[Event]) -> list[SpendRecorded]:
    return [e for e in events if isinstance(e, SpendRecorded)]


async def _worker(dep: Any, tmp_path: Path, data_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    """The openai provider actor in a process of its own (``env``: its settings), ready."""
    config_file = tmp_path / "vapora.toml"
    config_file.write_text(config_text(dep.sim.base_url))
    return await started(dep.server.url, config_file, data_dir, {**KEYS, **env})


async def test_spend_held_by_a_killed_provider_actor_is_appended_by_the_next(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        data_dir = tmp_path / "data"
        worker = await _worker(dep, tmp_path, data_dir, ACK_TIMEOUT_S="1")
        try:
            # The log refuses every append from now on: a full stream that discards new messages.
            js = dep.log.js
            info = await js.stream_info(dep.log.settings.name)
            full = dataclasses.replace(
                info.config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW
            )
            await js.update_stream(full)
            call = _call("T-killed")
            reply = await dep.nc.request(subjects.provider_call("openai"), call, timeout=15)
            result = decode(reply.data, ProviderCallResult)
            assert result.cost_usd > 0
            await until(lambda: any(p.stat().st_size for p in held_files(data_dir)), within_s=15)
        finally:
            _kill(worker)
        assert worker.returncode == -signal.SIGKILL
        await js.update_stream(
            dataclasses.replace(info.config, max_msgs=-1, discard=DiscardPolicy.OLD)
        )
        async with _successor(dep, data_dir):
            events = await _events_once(dep, "T-killed", lambda events: bool(_spends(events)))
            assert [s.cost_usd for s in _spends(events)] == [result.cost_usd]
            await until(lambda: not held_files(data_dir))


async def test_spend_on_its_way_to_the_log_when_the_actor_is_killed_is_appended_by_the_next(
    tmp_path: Path,
) -> None:
    # The window before a hold: the provider answered, the call's events went to the log, the
    # log had not acknowledged them yet (up to its 30 s timeout). They were in memory only, so a
    # SIGKILL then (the OOM killer, a node lost) lost a call the provider billed.
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        data_dir = tmp_path / "data"
        # The worker appends to subjects of its own where nobody acknowledges: its appends
        # wait, as for a log that is slow to answer.
        swallowed: list[bytes] = []
        sink = await dep.nc.subscribe("stalled.events.>", cb=_keep(swallowed))
        # Its start waits for its health event's acknowledgement (never coming) that long.
        worker = await _worker(
            dep, tmp_path, data_dir, EVENTS_PREFIX="stalled.events", ACK_TIMEOUT_S="8"
        )
        try:
            # Its answer waits for the log (durable_reply): asked, not awaited.
            call = _call("T-on-its-way")
            await dep.nc.publish(subjects.provider_call("openai"), call, reply="_INBOX.nobody")
            # The call's events sent, never acknowledged.
            await until(lambda: b"T-on-its-way" in b"".join(swallowed), within_s=15)
        finally:
            _kill(worker)
            await sink.unsubscribe()
        assert not held_files(data_dir)  # not held: it was still waiting for the log
        async with _successor(dep, data_dir):
            events = await _events_once(dep, "T-on-its-way", lambda events: bool(_spends(events)))
            [spent] = _spends(events)
            assert spent.cost_usd > 0 and spent.provider == "openai"
            await until(lambda: not inflight_files(data_dir))


async def test_a_call_the_provider_had_when_the_actor_was_killed_is_recorded_at_its_bound(
    tmp_path: Path,
) -> None:
    # Killed while the provider had the call (the request sent, no answer yet): the provider
    # bills it, and vapora recorded nothing; the attempt's hold expired and the budget was freed
    # of money spent. The call is written ahead before it goes out, at its upper bound.
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        data_dir = tmp_path / "data"
        worker = await _worker(dep, tmp_path, data_dir)
        prompt = "a call cut by a kill"
        try:
            call = _call(
                "T-mid-call",
                "gpt-4o-mini-slow-10000",
                attempt=2,
                prompt=prompt,
                reservation_id="r-mid-call",
            )
            await dep.nc.publish(subjects.provider_call("openai"), call, reply="_INBOX.nobody")
            await until(
                lambda: any(prompt.encode() in r.body for r in dep.sim.app.requests),
                within_s=15,
            )
        finally:
            _kill(worker)
        assert not held_files(data_dir)
        async with _successor(dep, data_dir):
            events = await _events_once(dep, "T-mid-call", lambda events: len(events) >= 2)
        [failed] = [e for e in events if isinstance(e, CallFailed)]
        [spent] = [e for e in events if isinstance(e, SpendRecorded)]
        assert failed.error_class == "cancelled" and "upper bound" in failed.message
        assert (spent.reservation_id, spent.attempt, spent.output_tokens) == ("r-mid-call", 2, 16)
        assert spent.cost_usd == failed.cost_usd > 0
        assert spent.input_tokens >= len(prompt) // 4  # the input's bound, not a guess below it
        assert not inflight_files(data_dir)


async def test_a_call_that_ended_leaves_nothing_at_its_bound_for_an_adopter(
    tmp_path: Path,
) -> None:
    # Written ahead at its bound, then ended: a success's events replace it (same ids); a
    # failure that billed nothing has no spend, so the one written ahead is said done with the
    # failure. Killed at once after, an adopter must add no spend to what the log has.
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        data_dir = tmp_path / "data"
        worker = await _worker(dep, tmp_path, data_dir)
        try:
            for task_id, model in (("T-ok", "gpt-4o-mini"), ("T-refused", "gpt-4o-mini-error-400")):
                call = _call(task_id, model)
                await dep.nc.request(subjects.provider_call("openai"), call, timeout=15)
        finally:
            _kill(worker)
        before = {task: await dep.events_of(task) for task in ("T-ok", "T-refused")}
        async with _successor(dep, data_dir):
            await until(lambda: not inflight_files(data_dir))
        after = {task: await dep.events_of(task) for task in ("T-ok", "T-refused")}
        assert [type(e) for e in before["T-ok"]] == [CallSucceeded, SpendRecorded]
        assert [type(e) for e in before["T-refused"]] == [CallFailed]
        for task, events in after.items():  # anything appended again is the same event, once
            assert {e.id: e for e in events} == {e.id: e for e in before[task]}, task


def _keep(into: list[bytes]) -> Any:
    async def keep(message: Any) -> None:
        into.append(message.data)  # and no answer: the publisher waits for its acknowledgement

    return keep
