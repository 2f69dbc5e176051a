"""vapora's connection class against a real nats-server: what it puts on the wire for headers
is what nats-py would, as read by a plain nats-py client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import BadHeaderError, MaxPayloadError

from actors.connection import Client, ConnectionFailed, ConnectOptions, connect
from actors.server import EmbeddedNats

pytestmark = pytest.mark.anyio


async def subscribed(plain: NATS, subject: str) -> Subscription:
    """A plain nats-py subscription that the server has once this returns.

    nats-py's ``flush()`` writes its PING ahead of the SUB still queued for its flusher, so its
    PONG does not say the server has the SUB (a message published then was dropped, now and then).
    The flusher writes the SUB while the first flush waits: the second PING goes after it.
    """
    sub = await plain.subscribe(subject)
    await plain.flush()
    await plain.flush()
    return sub


async def received_by_plain_nats_py(
    nats_server: EmbeddedNats, nc: Client, subject: str, headers: dict[str, str] | None
) -> Msg:
    plain = await nats.connect(nats_server.url)
    try:
        sub = await subscribed(plain, subject)
        await nc.publish(subject, b"body", reply="the.reply", headers=headers)
        with anyio.fail_after(5):
            return await sub.next_msg(timeout=5)
    finally:
        await plain.close()


async def test_headers_arrive_as_nats_py_sends_them(
    nats_server: EmbeddedNats, nc: Client, unique: str
) -> None:
    headers = {
        "Nats-Msg-Id": "abc-123",
        " Padded-Name ": "  padded value  ",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Multi-Line": "one\r\ntwo\nthree",
        "": "skipped",
    }
    msg = await received_by_plain_nats_py(nats_server, nc, f"t{unique}.h", headers)
    assert msg.data == b"body"
    assert msg.reply == "the.reply"
    assert msg.headers == {
        "Nats-Msg-Id": "abc-123",
        "Padded-Name": "padded value",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Multi-Line": "one  two three",
    }


async def test_an_empty_header_map_and_no_headers_both_deliver_the_body(
    nats_server: EmbeddedNats, nc: Client, unique: str
) -> None:
    for headers in ({}, None):
        msg = await received_by_plain_nats_py(nats_server, nc, f"t{unique}.e", headers)
        assert msg.data == b"body"
        assert not msg.headers


@pytest.mark.parametrize("name", ["Bad Name", "Colon:Name", "Ünïcode"])
async def test_an_invalid_header_name_is_refused_before_anything_is_sent(
    nc: Client, unique: str, name: str
) -> None:
    with pytest.raises(BadHeaderError):
        await nc.publish(f"t{unique}.bad", b"x", headers={name: "v"})
    with pytest.raises(BadHeaderError):  # refused again, not remembered as checked
        await nc.publish(f"t{unique}.bad", b"x", headers={name: "v"})


async def test_a_request_cancelled_by_its_caller_leaves_no_waiter_and_the_next_one_works(
    nc: Client, unique: str
) -> None:
    silent = await nc.subscribe(f"t{unique}.silent")  # takes requests, never answers

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(f"t{unique}.echo", cb=echo)
    with anyio.move_on_after(0.2) as scope:
        await nc.request(f"t{unique}.silent", b"x", timeout=30)
    assert scope.cancelled_caught
    assert not nc._waiters  # nothing left to match a late reply against
    reply = await nc.request(f"t{unique}.echo", b"again", timeout=5)
    assert reply.data == b"again"
    await silent.unsubscribe()


async def test_a_request_nobody_answers_times_out_with_nats_timeout_error(
    nc: Client, unique: str
) -> None:
    silent = await nc.subscribe(f"t{unique}.quiet")
    started = anyio.current_time()
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(f"t{unique}.quiet", b"x", timeout=0.3)
    assert 0.25 <= anyio.current_time() - started < 5
    assert not nc._waiters
    await silent.unsubscribe()


async def test_the_first_message_of_a_turn_is_written_at_once_and_the_rest_queued(
    nats_server: EmbeddedNats, nc: Client, unique: str
) -> None:
    """A message with nothing ahead of it goes to the socket at once (no wait for the flusher's
    turn); the others published in the same turn are queued and written together, after it."""
    plain = await nats.connect(nats_server.url)
    try:
        sub = await subscribed(plain, f"t{unique}.>")
        await anyio.sleep(0.05)  # a fresh turn, nothing queued
        await nc.publish(f"t{unique}.a", b"0")
        assert not nc._pending  # written, not queued
        for n in range(1, 50):  # the same turn: queued for one write
            await nc.publish(f"t{unique}.b", str(n).encode(), headers={"N": str(n)})
        assert len(nc._pending) == 49
        with anyio.fail_after(5):
            got = [(await sub.next_msg(timeout=5)).data for _ in range(50)]
        assert got == [str(n).encode() for n in range(50)]  # in order, none lost
    finally:
        await plain.close()


async def test_many_publishers_at_once_arrive_complete_and_in_order_each(
    nats_server: EmbeddedNats, nc: Client, unique: str
) -> None:
    plain = await nats.connect(nats_server.url)
    try:
        sub = await subscribed(plain, f"t{unique}.*")

        async def publisher(p: int) -> None:
            for n in range(100):
                await nc.publish(f"t{unique}.{p}", str(n).encode())
                if n % 7 == 0:
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for p in range(8):
                tg.start_soon(publisher, p)
        seen: dict[str, list[int]] = {}
        with anyio.fail_after(10):
            for _ in range(800):
                msg = await sub.next_msg(timeout=5)
                seen.setdefault(msg.subject, []).append(int(msg.data))
        assert all(numbers == list(range(100)) for numbers in seen.values())
        assert len(seen) == 8
    finally:
        await plain.close()


class PingGate:
    """A TCP relay to the server that, once ``armed``, passes what the client writes up to its
    next PING and holds the rest until :meth:`release`: the server answers that PING having read
    only what the client wrote before it, however fast the client writes the rest."""

    def __init__(self, server: EmbeddedNats) -> None:
        self.server = server
        self.armed = False
        self.holding = False
        self.held = b""
        self.upstream: anyio.abc.SocketStream | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(f"nats://127.0.0.1:{port}")
        await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        assert self.server.port is not None
        async with client, await anyio.connect_tcp(self.server.host, self.server.port) as up:
            self.upstream = up
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._answers, up, client)
                async for chunk in client:
                    await self._pass(chunk)
                tg.cancel_scope.cancel()

    @staticmethod
    async def _answers(up: anyio.abc.SocketStream, client: anyio.abc.SocketStream) -> None:
        async for chunk in up:
            await client.send(chunk)

    async def _pass(self, chunk: bytes) -> None:
        if self.holding:
            self.held += chunk
            return
        if self.armed and b"PING\r\n" in chunk:
            cut = chunk.index(b"PING\r\n") + len(b"PING\r\n")
            chunk, self.held = chunk[:cut], chunk[cut:]
            self.armed, self.holding = False, True
        assert self.upstream is not None
        await self.upstream.send(chunk)

    async def release(self) -> None:
        assert self.upstream is not None
        while self.held:  # still holding while it sends: what arrives meanwhile goes after it
            data, self.held = self.held, b""
            await self.upstream.send(data)
        self.holding = False


async def test_flush_returns_once_the_server_has_a_subscription_made_before_it(
    nats_server: EmbeddedNats, nc: Client, unique: str
) -> None:
    """What an actor relies on when it says it is ready: a message published after its
    ``subscribe(); flush()``, from any connection, is delivered to it."""
    gate = PingGate(nats_server)
    async with anyio.create_task_group() as tg:
        url = await tg.start(gate.serve)
        listener = await connect(ConnectOptions.from_url(url, name="listener"))
        try:
            sub = await listener.subscribe(f"t{unique}.ready")  # queued, not yet written
            gate.armed = True
            await listener.flush()
            await nc.publish(f"t{unique}.ready", b"after the flush")
            await nc.flush()  # the server has routed it
            await gate.release()
            await listener.flush()
            await nc.publish(f"t{unique}.ready", b"after the release")
            with anyio.fail_after(5):
                first = await sub.next_msg(timeout=5)
        finally:
            await listener.close()
            tg.cancel_scope.cancel()
    assert first.data == b"after the flush"  # not dropped for want of the subscription


async def test_a_handler_that_raises_makes_the_connection_reconnect_not_go_deaf(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw-path handler runs inside the connection's reader. If one raises (a bug), the reader
    reconnects instead of stopping: nats-py's loop stopped and the connection stayed "connected"
    while nothing more was read on any subject."""
    client = await connect(ConnectOptions.from_url(nats_server.url, name="raises"))
    other = await nats.connect(nats_server.url)
    try:
        got: list[bytes] = []

        def broken(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            raise RuntimeError("a bug in a handler")

        await client.subscribe_raw("t.broken", broken)
        await client.subscribe_raw("t.fine", lambda s, r, data, h: got.append(data))
        await client.flush()
        await other.publish("t.broken", b"boom")
        await other.flush()
        with anyio.fail_after(20):
            while not got:  # re-sent until the reconnected client has its subscription back
                await other.publish("t.fine", b"after")
                await other.flush()
                await anyio.sleep(0.1)
        assert got[0] == b"after" and client.stats["reconnects"] >= 1
        assert any("reconnecting" in r.getMessage() for r in caplog.records)
    finally:
        await other.close()
        await client.close()


ONE_MB = "max_payload: 1048576\n"  # nats-server's own default (vapora's embedded server: 16 MB)


async def test_a_message_past_max_payload_with_its_headers_is_refused_before_it_is_sent(
    tmp_path: Path,
) -> None:
    """nats-py checks the payload alone against ``max_payload``: 600 KB of headers and 600 KB of
    body went out, and the server closed the connection for it (with every actor on it)."""
    async with EmbeddedNats(tmp_path / "nats", extra_config=ONE_MB) as server:
        client = await connect(ConnectOptions.from_url(server.url, name="big"))
        try:
            assert client.max_payload == 1_048_576
            with pytest.raises(MaxPayloadError):
                await client.publish("t.big", b"b" * 600_000, headers={"x-big": "h" * 600_000})
            reply = await _echoed(client)
            assert reply == b"still here" and client.is_connected
        finally:
            await client.close()


async def test_the_servers_max_payload_refusal_makes_the_connection_reconnect_not_close(
    tmp_path: Path,
) -> None:
    """The server answers a message past its ``max_payload`` with ``-ERR`` and closes the
    connection; nats-py then closed the client for good, and every actor on it stayed deaf in a
    process that kept running (no supervisor would restart it)."""
    async with EmbeddedNats(tmp_path / "nats", extra_config=ONE_MB) as server:
        client = await connect(ConnectOptions.from_url(server.url, name="refused"))
        try:
            size = 2_000_000  # written raw: the checks before sending are not what is tested
            await client._send_command(f"PUB t.big {size}\r\n".encode() + b"b" * size + b"\r\n")
            await client._flush_pending()
            with anyio.fail_after(20):
                while client.stats["reconnects"] < 1 or not client.is_connected:
                    assert not client.is_closed, "closed for good, not reconnecting"
                    await anyio.sleep(0.05)
            assert await _echoed(client) == b"still here"
        finally:
            await client.close()


async def _echoed(client: Client) -> bytes:
    """A request answered by a subscription on the same connection (it works end to end)."""

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    sub = await client.subscribe("t.echo", cb=echo)
    try:
        await client.flush()
        return (await client.request("t.echo", b"still here", timeout=5)).data
    finally:
        await sub.unsubscribe()


class _Impostor:
    """A TCP server that speaks the first line of NATS (an INFO that does not require TLS) and
    keeps whatever the client sends (a CONNECT carries the user and password)."""

    def __init__(self) -> None:
        self.received = b""
        self.port = 0

    async def __aenter__(self) -> _Impostor:
        self.listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = self.listener.extra(anyio.abc.SocketAttribute.local_port)
        self.tg = anyio.create_task_group()
        await self.tg.__aenter__()
        self.tg.start_soon(self.listener.serve, self._serve)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.tg.cancel_scope.cancel()
        await self.tg.__aexit__(None, None, None)
        await self.listener.aclose()

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        info = b'INFO {"server_id":"x","version":"2.10.0","max_payload":1048576,"proto":1}\r\n'
        with contextlib.suppress(Exception):
            await stream.send(info)
            with anyio.move_on_after(2):
                while True:
                    self.received += await stream.receive()


@pytest.mark.parametrize("how", ["tls:// URL", "[nats.tls] ca", "an empty [nats.tls]"])
async def test_a_connection_to_use_tls_sends_no_credentials_to_a_server_without_it(
    how: str, tmp_path: Path
) -> None:
    """nats-py goes on in plain text when the server's INFO does not require TLS, whatever the
    URL or the TLS settings said: the user and password went to an impostor in the clear. An
    empty ``[nats.tls]`` (the system's CAs) asked for no TLS at all: `vapora config` said
    "tls yes" and the password went in the clear (a review)."""
    from tests.cluster.certs import make_tls_files
    from vapora.cli import _connect_options
    from vapora.config import parse_config

    async with _Impostor() as impostor:
        if how == "tls:// URL":
            options = ConnectOptions(servers=(f"tls://127.0.0.1:{impostor.port}",))
        elif how == "an empty [nats.tls]":
            url = f"nats://127.0.0.1:{impostor.port}"
            text = (
                f'[[providers]]\nname = "ollama"\nmodel = "m"\n[nats]\nurl = "{url}"\n[nats.tls]\n'
            )
            config = parse_config(text, source="t.toml", at=datetime.now(UTC))
            options = _connect_options(config, url, "t")
        else:
            ca = make_tls_files(tmp_path).ca
            options = ConnectOptions(
                servers=(f"nats://127.0.0.1:{impostor.port}",), tls_ca_file=str(ca)
            )
        options = dataclasses.replace(options, user="bob", password="hunter2", initial_deadline=5.0)
        with pytest.raises(ConnectionFailed, match="does not require TLS"):
            await connect(options)
        assert b"hunter2" not in impostor.received and b"CONNECT" not in impostor.received


async def _publish_on_a_socket_closed_under_the_connection(directory: Path) -> None:
    async with EmbeddedNats(directory) as server:
        client = await connect(ConnectOptions.from_url(server.url, reconnect_wait=0.1))
        plain = await nats.connect(server.url)
        try:
            sub = await subscribed(plain, "t.closed.>")
            await anyio.sleep(0.05)  # a fresh turn: the publish would be written at once
            client._transport._io_writer.transport.abort()  # type: ignore[union-attr]
            assert client.is_connected
            await client.publish("t.closed.a", b"kept")
            await client.publish("t.closed.b", b"kept too")  # (queued for the flusher)
            with pytest.raises(nats.errors.FlushTimeoutError):
                await client.flush(timeout=0.5)
            with anyio.fail_after(10):
                got = [(await sub.next_msg(timeout=10)).data for _ in range(2)]
            assert got == [b"kept", b"kept too"]
            assert client.stats["reconnects"] >= 1
        finally:
            await plain.close()
            await client.close()


@pytest.mark.parametrize("uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_publish_on_a_socket_closed_under_the_connection_is_sent_after_the_reconnect(
    tmp_path: Path, uvloop: bool
) -> None:
    """The server (or the network) closes the socket; until nats-py's reader sees it, the
    connection still says "connected". A publish then was lost (written into the closed
    socket: asyncio's transport drops it without a word) or raised uvloop's "handler is
    closed" out of the publisher (an event log append in the cluster test, a node killed). It
    is queued and sent to the server reconnected to; a flush meanwhile times out, as on a lost
    network. On both loops vapora runs on (each run in a thread of its own)."""
    if uvloop:
        pytest.importorskip("uvloop")
    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # (the suite's loop runs here)
        thread.submit(
            anyio.run,
            _publish_on_a_socket_closed_under_the_connection,
            tmp_path / "nats",
            backend="asyncio",
            backend_options={"use_uvloop": uvloop},
        ).result()


async def test_a_creds_file_authenticates_with_an_operator_mode_server(tmp_path: Path) -> None:
    """`[nats] creds` (a JWT and an NKey seed, the usual credentials of a managed NATS) never
    worked: nats-py needs the `nkeys` package to sign the server's nonce, which vapora did not
    depend on ("No module named 'nkeys'", shown as "unhandled errors in a TaskGroup")."""
    from tests.cluster.creds import make_creds
    from vapora.cli import _connect_options
    from vapora.config import parse_config

    creds = make_creds(tmp_path / "creds")
    async with EmbeddedNats(tmp_path / "nats", extra_config=creds.server_config) as server:
        text = (
            '[[providers]]\nname = "ollama"\nmodel = "m"\n'
            f'[nats]\nurl = "{server.url}"\ncreds = "{creds.creds_file}"\n'
        )
        config = parse_config(text, source="t.toml", at=datetime.now(UTC))
        client = await connect(_connect_options(config, server.url, "t"))
        try:
            sub = await client.subscribe("t.creds")
            await client.publish("t.creds", b"signed in")
            assert (await sub.next_msg(timeout=5)).data == b"signed in"
        finally:
            await client.close()
        without = dataclasses.replace(
            _connect_options(config, server.url, "t"), creds_file=None, initial_deadline=5.0
        )
        with pytest.raises(ConnectionFailed, match="authentication failed") as refused:
            await connect(without)
        assert creds.seed not in str(refused.value)


def test_a_connection_error_in_a_group_of_one_is_said_as_itself() -> None:
    from actors.connection import _cause

    missing = ModuleNotFoundError("No module named 'nkeys'")
    group = ExceptionGroup("unhandled errors in a TaskGroup", [missing])
    assert (
        _cause(ExceptionGroup("outer", [group])) == "ModuleNotFoundError: No module named 'nkeys'"
    )
    two = ExceptionGroup("g", [OSError("refused"), TimeoutError()])
    assert _cause(two) == "OSError: refused; TimeoutError"


async def test_tls_asked_for_with_a_plain_websocket_url_is_refused_before_connecting() -> None:
    """A ws:// URL's traffic is plain whatever [nats.tls] says (a WebSocket's TLS is wss://):
    it went in the clear while `vapora config` said "tls yes" (a review)."""
    options = ConnectOptions(
        servers=("ws://127.0.0.1:1",), tls_required=True, user="u", password="pw"
    )
    from vapora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plain WebSocket URL: use wss://"):
        await connect(options)
