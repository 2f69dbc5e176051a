"""The client library and the commands at their edges (found by a review): a stream that fails
when used without ``async with``, strings no UTF-8 carries, a NATS server that is down, a
corrupt ledger file, an audit of an empty log, out-of-range ports."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.fault.provider_harness import config_text, deployment
from vapora.cli.money import audit_command
from vapora.client import Client
from vapora.errors import (
    ConfigError,
    InvalidRequest,
    NoProviderAvailable,
    NotConnected,
    VaporaError,
)
from vapora.ledger import Ledger

pytestmark = pytest.mark.anyio

VAPORA = [sys.executable, "-m", "vapora.cli"]


def failing_openai(base_url: str) -> str:
    return config_text(base_url, models={"openai": "gpt-4-error-400"})


async def test_a_stream_that_fails_without_async_with_lets_go_of_its_subscription(
    tmp_path: Path,
) -> None:
    """The README's ``async for chunk in client.stream(...)``: each failed stream left its
    subscription open (40 failures, 40 subscriptions)."""
    async with deployment(tmp_path, failing_openai) as dep:
        stream = dep.client.stream(prompt="hello", provider="openai")
        with pytest.raises(VaporaError):
            async for _ in stream:
                pass
        assert stream._sub is None


async def test_a_string_no_utf8_carries_is_a_400_before_anything_is_sent(tmp_path: Path) -> None:
    async with deployment(tmp_path, config_text) as dep:
        with pytest.raises(InvalidRequest, match="not UTF-8"):
            await dep.client.complete(prompt="caf\udce9")


async def test_connecting_to_a_nats_server_that_is_down_fails_fast_and_clearly() -> None:
    """It retried for two minutes, printed 61 tracebacks and raised nats-py's own error."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with anyio.fail_after(20):
        with pytest.raises(NoProviderAvailable, match="cannot connect to NATS") as failed:
            async with Client.connect(f"nats://127.0.0.1:{port}", initial_deadline_s=3):
                pass
    # Told apart from "every provider is down" (its own class, still a NoProviderAvailable),
    # naming why: the deadline's TimeoutError said nothing.
    assert isinstance(failed.value, NotConnected) and failed.value.code == "not_connected"
    assert "ConnectionRefusedError" in str(failed.value)


async def test_a_corrupt_ledger_file_is_named_and_nothing_is_left_running(tmp_path: Path) -> None:
    """It was a traceback, and the database's worker thread kept the process alive."""
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"garbage " * 1000)
    with pytest.raises(ConfigError, match="not a ledger this version can read"):
        await Ledger.open(path)


async def test_an_audit_of_an_empty_log_checked_nothing_and_says_so(tmp_path: Path) -> None:
    """It printed "0 events ... no differences" and exited 0 (a wrong server, a wrong dir)."""
    async with deployment(tmp_path, config_text, providers=[], router=False) as dep:
        code, text = await audit_command(dep.nc, dep.log, tmp_path)
    assert code == 2 and "the event log is empty" in text


def test_ports_out_of_range_and_in_use_are_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [*VAPORA, "simulate", "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "must be a port in 0..65535" in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*VAPORA, "up", "--port", str(port), "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_stream_sent_again_after_no_router_answered_keeps_its_task_scope(
    conn: object,
) -> None:
    """The stream's request, published again after the first found no router, lost its
    ``Vapora-Task-Scope: request`` header: the router took the id the client had made up for
    one the caller chose, and reserved each paid attempt with the keeper."""
    from nats.aio.msg import Msg

    from events import subjects
    from events.codec import encode
    from events.contract import ErrorBody, StreamError

    nc: Any = conn
    seen: list[dict[str, str]] = []

    async def late_router(msg: Msg) -> None:
        seen.append(dict(msg.headers or {}))
        error = StreamError(error=ErrorBody(code="internal", message="enough"))
        await nc.publish(msg.reply, encode(error))

    stream = Client(nc).stream(prompt="hello")
    async with anyio.create_task_group() as tg:

        async def serve_after_the_first_try() -> None:
            await anyio.sleep(0.05)  # the first publish finds nobody on vapora.stream
            await nc.subscribe(subjects.STREAM, cb=late_router)

        tg.start_soon(serve_after_the_first_try)
        with pytest.raises(VaporaError):
            async for _ in stream:
                pass
    assert seen and seen[0].get(subjects.TASK_SCOPE_HEADER) == "request"


async def test_a_callers_error_callback_of_any_kind_is_called_and_the_cause_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Client.connect`` wraps the caller's ``error_cb`` to learn why no try connected: a plain
    function or an async callable object is called as nats-py would call a coroutine function,
    and the failure names the connection's error, not the callback's type."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{probe.getsockname()[1]}"  # closed once the block ends
    seen: list[Exception] = []

    class Async:
        async def __call__(self, exc: Exception) -> None:
            seen.append(exc)

    for callback in (seen.append, Async()):
        with pytest.raises(NotConnected, match="ConnectionRefusedError"):
            async with Client.connect(url, initial_deadline_s=1, error_cb=callback):
                pass
    assert seen and all(isinstance(e, ConnectionRefusedError) for e in seen)
    # A password in the URL is not in the error (the README's promise for every URL shown).
    # Without a callback of the caller's, the tries are not logged one by one (nats-py's own
    # logged each with its traceback, about 60 in 15 s): the error says why.
    secret = url.replace("nats://", "nats://svc:s3cret-pass@")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NotConnected) as failed:
        async with Client.connect(secret, initial_deadline_s=1):
            pass
    assert "s3cret-pass" not in str(failed.value) and "svc:***@" in str(failed.value)
    assert not [r for r in caplog.records if r.name.startswith("nats")], caplog.text[:500]


async def test_a_command_reaches_a_cluster_whose_first_server_hangs(tmp_path: Path) -> None:
    """One node's host down (its port accepts and never speaks) holds a connection try for the
    whole connect timeout: a command's deadline of 5 s with the services' 5 s tries failed
    whenever it tried that node first. Each server now gets a try of its own."""
    from actors.server import EmbeddedNats

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        dead = f"nats://127.0.0.1:{hung.getsockname()[1]}"
        async with EmbeddedNats(tmp_path / "nats") as server:
            command = [sys.executable, "-m", "vapora.cli", "stream", "--nats-url"]
            command.append(f"{dead},{server.url}")
            for _ in range(3):  # nats-py tries the servers in a random order
                made = await anyio.to_thread.run_sync(
                    lambda: subprocess.run(
                        command,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=False,
                    )
                )
                assert made.returncode == 0, made.stderr


async def test_an_audit_of_another_logs_ledger_says_so_not_that_it_lags(tmp_path: Path) -> None:
    """A ledger file another deployment left in the directory (./.vapora, the default) was
    audited against this log: every row a difference, and the advice to wait for the ledger
    to catch up, where the exit-2 "wrong data directory" case belonged."""
    from actors.cost_ledger import CostLedger

    async def calls_with_a_ledger(where: Path, n: int) -> None:
        async with deployment(where, config_text) as dep:
            ledger = CostLedger(dep.runtime)
            async with anyio.create_task_group() as tg:
                await tg.start(ledger.run)
                for _ in range(n):
                    await dep.client.complete(prompt="hi", provider="openai")
                last = await dep.log.last_sequence()
                with anyio.fail_after(10):
                    while ledger.position < last:  # noqa: ASYNC110 - the ledger's own task
                        await anyio.sleep(0.01)
                ledger.stop()

    (tmp_path / "a").mkdir()
    await calls_with_a_ledger(tmp_path / "a", 2)
    (tmp_path / "b").mkdir()
    async with deployment(tmp_path / "b", config_text) as other:
        await other.client.complete(prompt="hi", provider="openai")
        code, text = await audit_command(other.nc, other.log, tmp_path / "a")
    assert code == 2, text
    assert "was written from another event log" in text and "--data-dir" in text
    # `vapora report` over the same mix added the other ledger's rows to this log's spend and
    # printed the sum (a review): refused as the audit refuses it.
    shutil.copy(tmp_path / "a" / "ledger.sqlite3", tmp_path / "b" / "ledger.sqlite3")
    done = await anyio.run_process(
        [*VAPORA, "report", "--data-dir", str(tmp_path / "b")], check=False
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "was written from another event log" in stderr and b"Total" not in done.stdout


async def test_an_audit_names_spend_a_stopped_provider_actor_left_on_its_way(
    tmp_path: Path,
) -> None:
    """A provider actor killed mid-call leaves the call's spend (at its upper bound) in its
    write-ahead file until an actor adopts it: the audit of the log said "no differences" and
    exited 0 meanwhile (a review). A file a live actor locks is its own: not named. (The files
    are a provider this deployment has not: none of its actors adopts them meanwhile.)"""
    import fcntl

    from actors.cost_ledger import CostLedger
    from events.codec import encode
    from tests.fault.money import exact_usage, spend

    async with deployment(tmp_path, config_text) as dep:
        ledger = CostLedger(dep.runtime)
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            await dep.client.complete(prompt="hi", provider="openai")
            last = await dep.log.last_sequence()
            with anyio.fail_after(10):
                while ledger.position < last:  # noqa: ASYNC110 - the ledger's own task
                    await anyio.sleep(0.01)
            clean, _ = await audit_command(dep.nc, dep.log, tmp_path)
            left = spend(
                task_id="t-killed", usage=exact_usage(Decimal("0.06")), at=datetime.now(UTC)
            )
            orphan = tmp_path / "inflight-provider-gone-0123456789ab.jsonl"
            orphan.write_bytes(encode(left) + b"\n")
            live = tmp_path / "inflight-provider-gone-ba9876543210.jsonl"
            other = spend(
                task_id="t-live", usage=exact_usage(Decimal("0.03")), at=datetime.now(UTC)
            )
            live.write_bytes(encode(other) + b"\n")
            with live.open("rb") as held:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a live instance's file
                code, text = await audit_command(dep.nc, dep.log, tmp_path)
            ledger.stop()
    assert clean == 0
    assert code == 1, text
    assert "1 spend events ($0.06) are not in the ledger" in text
    assert orphan.name in text and live.name not in text
