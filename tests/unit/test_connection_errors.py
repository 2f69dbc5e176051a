"""The connection's error callback while the server is away: nats-py reports a failed reconnect
every half second, each an ERROR line (a review counted ~200 from one `vapora ask` waiting out a
server's absence). The same error is said once, then again at most every ``repeat_s``."""

from __future__ import annotations

import logging

import anyio
import pytest

from actors.connection import _Refusal

pytestmark = pytest.mark.anyio


async def test_the_same_connection_error_is_said_once_a_while_with_how_many_were_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher = _Refusal("vapora-ask", repeat_s=0.2)
    watcher._connecting = False  # the first connection is up: its errors are said
    refused = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.ERROR, logger="vapora.nats"):
        for _ in range(5):
            await watcher.error_cb(refused)
        await anyio.sleep(0.25)
        await watcher.error_cb(refused)
        await watcher.error_cb(TimeoutError())  # another error: said at once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "nats (vapora-ask): ConnectionRefusedError: [Errno 111] Connection refused",
        "nats (vapora-ask): ConnectionRefusedError: [Errno 111] Connection refused"
        " (and 4 more since)",
        "nats (vapora-ask): TimeoutError",
    ]


async def test_errors_that_alternate_between_a_clusters_servers_are_each_said_once_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reconnecting goes round the servers, so consecutive errors differ by address: compared
    # with the last one only, none was held back (23 lines in 6 s with two URLs).
    watcher = _Refusal("vapora-ask", repeat_s=30)
    watcher._connecting = False
    first = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 11424)")
    second = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 11496)")
    with caplog.at_level(logging.ERROR, logger="vapora.nats"):
        for _ in range(10):
            await watcher.error_cb(first)
            await watcher.error_cb(second)
    assert len(caplog.records) == 2


async def test_the_errors_remembered_are_bounded_whatever_their_variety() -> None:
    # A slow consumer's error names each dropped message's subject: a new text per message.
    watcher = _Refusal("vapora-ask", repeat_s=30)
    watcher._connecting = False
    for n in range(1000):
        await watcher.error_cb(RuntimeError(f"slow consumer on task.{n}"))
    assert len(watcher._said) == 64
