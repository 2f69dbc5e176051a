"""Connecting an actor to NATS: server list, credentials, TLS, reconnect with backoff.

Authentication failures and permission violations are logged as clear one-line errors (never with
a secret) instead of being swallowed, and a first connection that cannot be made raises
:class:`ConnectionFailed` naming the servers tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from actors.protocol import FastParser, RawBatch, RawMessage
from events import subjects
from vapora.config import redact_url
from vapora.errors import ConfigError, describe

__all__ = [
    "Client",
    "ConnectOptions",
    "ConnectionFailed",
    "PermissionDenied",
    "RawHandler",
    "connect",
]

log = logging.getLogger("vapora.nats")

# How much one read from the server may return (nats-py reads 32 KiB).
_READ_SIZE = 262_144


class ConnectionFailed(RuntimeError):
    """No NATS server in the list accepted the connection."""


class PermissionDenied(ConnectionFailed):
    """The server refused to let this user publish to (or subscribe to) a subject.

    A :class:`ConnectionFailed` so that commands report it the same way: the user the
    connection authenticated as lacks a permission (see ``docs/operations-cluster.md``).
    """


# nats-py hands us the server's -ERR text in lower case, e.g.
# 'permissions violation for publish to "vapora.events.spend.x"'.
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"')
#: The server's -ERR for a message past its max_payload (it closes the connection after it).
_MAX_PAYLOAD_VIOLATION = "maximum payload violation"


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """How to reach NATS. ``servers`` may list several URLs of one cluster."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "vapora"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: TLS asked for (a ``[nats.tls]`` table, even an empty one): verified against the
    #: system's CAs when no CA file is named.
    tls_required: bool = False
    connect_timeout: float = 5.0
    # How long the *first* connection may take, all servers and retries included.
    initial_deadline: float = 15.0
    reconnect_wait: float = 0.5
    max_reconnect_attempts: int = -1
    # pending_size bounds what nats-py buffers while disconnected (bytes).
    pending_size: int = 64 * 1024 * 1024
    # Where replies come back: None is ``_INBOX.<user>`` (events.subjects.inbox_prefix).
    inbox_prefix: str | None = None

    def __repr__(self) -> str:
        # The servers' user-info may hold a password or a token: masked, like the fields.
        servers = tuple(redact_url(server) for server in self.servers)
        return (
            f"ConnectOptions(servers={servers!r}, name={self.name!r}, user={self.user!r}, "
            f"creds_file={self.creds_file!r}, tls_ca_file={self.tls_ca_file!r})"
        )

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> ConnectOptions:
        """Options for a comma-separated list of server URLs."""
        servers = tuple(u.strip() for u in url.split(",") if u.strip())
        return cls(servers=servers, **kw)

    def tls_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context when TLS is asked for (``tls_required``) or a CA or client
        certificate is configured: the system's CAs when no CA file is named (an empty
        ``[nats.tls]`` connected in plain text, the config saying "tls yes")."""
        if not (self.tls_required or self.tls_ca_file or self.tls_cert_file):
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context


async def _disconnected_cb() -> None:
    log.info("nats: disconnected")


async def _reconnected_cb() -> None:
    log.info("nats: reconnected")


_CRLF = b"\r\n"


_STATUS_AT = len(b"NATS/1.0 ")


class _Reply:
    __slots__ = ("asked", "data", "done", "headers", "subject")

    def __init__(self, asked: str, done: asyncio.Future[None]) -> None:
        self.done = done  # a bare future: cheaper than an anyio Event plus a timeout scope
        self.asked = asked  # the request's subject: a refusal of it wakes this waiter
        self.subject = ""
        self.data = b""
        self.headers = b""


def raw_header(raw: bytes | None, name: str) -> str | None:
    """The value of header ``name`` in a NATS header block as received (``NATS/1.0\r\nName:
    value…``), as :meth:`Client._parse_header_lines` would give it, without parsing the whole
    block: a traced message's block is mostly its trace context, and a handler or a requester
    usually wants one header of it, or only to know that it is absent."""
    if not raw or not _token(name):  # the parse returns no name with spacing or non-ASCII
        return None
    key = name.encode()
    if key not in raw:
        return None
    at = raw.rfind(_CRLF + key + b":")  # the parse keeps the last of repeated names
    if at < 0 or raw.find(key) != at + 2 or raw.count(key) != 1:
        # The name elsewhere too (in a value, with spacing, repeated): the full parse decides.
        return Client._parse_header_lines(raw[raw.find(_CRLF) :]).get(name)
    start = at + len(key) + 3
    end = raw.find(_CRLF, start)
    return raw[start : end if end >= 0 else len(raw)].strip().decode("utf-8", "replace")


def _token(name: str) -> bool:
    """Whether ``name`` is one the full parse can return: ASCII, no spacing in or around it."""
    return name.isascii() and len(name.split()) == 1 and name == name.strip()


class ReplyMsg(Msg):
    """A reply whose header block is parsed when ``headers`` is first read.

    Replies are read for their data and, at most, one header (an error code: :meth:`header_value`);
    with tracing on every reply carries its trace context, which nothing on the requester's
    side reads, so parsing each block up front was work for nothing."""

    _raw: bytes | None = None
    _parsed: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        if self._parsed is None and self._raw:
            self._parsed = Client._parse_header_lines(self._raw[self._raw.find(_CRLF) :])
        return self._parsed

    @headers.setter
    def headers(self, value: dict[str, str] | None) -> None:
        self._raw = None  # replaced, as a Msg's would be: the block is not read again
        self._parsed = value

    def header_value(self, name: str) -> str | None:
        """One header's value (None: absent), read without parsing the whole block."""
        if self._parsed is not None or not self._raw:
            return (self._parsed or {}).get(name)
        return raw_header(self._raw, name)


def header(message: Msg, name: str) -> str | None:
    """Header ``name`` of ``message`` (a reply from :meth:`Client.request` is not parsed)."""
    if isinstance(message, ReplyMsg):
        return message.header_value(name)
    return (message.headers or {}).get(name)


def _expire(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


RawHandler = Callable[[bytes, bytes, bytes, bytes], None]
"""``handler(subject, reply, data, raw_headers)``, called synchronously by the reader."""


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_CHECKED_HEADER_NAMES: set[str] = set()


def _checked_header_name(name: str) -> str:
    """``name`` stripped ("" to skip it), refused as nats-py does when it is not a token."""
    key = name.strip()
    if not key:
        return ""
    if not _HEADER_NAME.fullmatch(key):
        raise nats_errors.BadHeaderError(key)
    if key == name and len(_CHECKED_HEADER_NAMES) < 1024:
        _CHECKED_HEADER_NAMES.add(key)
    return key


class TlsNotOffered(nats_errors.Error):
    """The server did not take the connection to TLS, which it was to use: refused before the
    credentials are sent (see :meth:`Client._connect_command`)."""

    def __str__(self) -> str:  # nats-py's errors print a fixed text of their own
        return str(self.args[0]) if self.args else "nats: the server does not require TLS"


class Client(NATS):
    """nats-py's client with a raw fast path and a faster header parser.

    ``subscribe_raw`` registers a synchronous handler that receives a subscription's messages as
    bytes straight from the protocol parser: no ``Msg`` object, no header parsing, no per-message
    queue and task hop. The event log's replay and acknowledgement paths use it; everything else
    goes through nats-py unchanged.

    Every stored event carries headers (``Nats-Msg-Id``, trace context), and nats-py's parser
    checks each header name character by character in a generator, which made header parsing the
    largest cost of a replay (profiled in ``bench/bench_runtime.py``). This parser accepts and
    rejects exactly the same lines, with a whitespace test done by ``str.split``.
    """

    _raw_handlers: dict[int, RawHandler | RawBatch]

    def __init__(self) -> None:
        super().__init__()
        self._ps = FastParser(self)
        self._wrote_this_turn = False  # see _write_now
        # The server's last permission violations, and requests waiting on their subject.
        self._violations: deque[tuple[str, str, str]] = deque(maxlen=64)
        self._denial_waiters: dict[str, set[anyio.Event | asyncio.Future[None]]] = {}

    async def _read_loop(self) -> None:
        """nats-py's read loop, reading up to :data:`_READ_SIZE` bytes at a time.

        nats-py reads 32 KiB at a time from a stream reader that pauses the socket above 64 KiB;
        on a replay that is a parser call per ~70 events and a pause/resume of the socket per
        two reads. Reading in larger slices made a replay ~8 % faster (``bench/bench_budget.py``).
        Errors are handled as nats-py does, but for one: an exception that is not the
        connection's (a message's handling failed) makes it reconnect instead of leaving it
        connected and deaf.
        """
        reader = getattr(self._transport, "_io_reader", None)
        if isinstance(reader, asyncio.StreamReader) and getattr(reader, "_limit", 0) < _READ_SIZE:
            reader._limit = _READ_SIZE  # type: ignore[attr-defined]  # the pause threshold / 2
        while True:
            try:
                if self.is_closed or self.is_reconnecting or self._transport is None:
                    break
                if self._transport.at_eof():
                    err = nats_errors.UnexpectedEOF()
                    await self._error_cb(err)
                    await self._process_op_err(err)
                    break
                data = await self._transport.read(_READ_SIZE)
                await self._ps.parse(data)
            except nats_errors.ProtocolError:
                await self._process_op_err(nats_errors.ProtocolError())
                break
            except OSError as exc:
                await self._process_op_err(exc)
                break
            except asyncio.CancelledError:
                break
            except Exception as exc:
                # A bug in a message's handling, not a protocol fault: reconnect rather than
                # stop reading (nats-py stops, and the connection stays "connected" but deaf).
                log.error("nats: error while reading from the server; reconnecting", exc_info=exc)
                await self._process_op_err(exc)
                break

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        """nats-py's ``_send_publish`` with the header block built as one string, written to
        the socket at once when nothing waits ahead of it (:meth:`_write_now`).

        Same rules as nats-py (names stripped, empty names skipped, invalid names refused with
        ``BadHeaderError``, CR/LF in values replaced by spaces); a name already checked is not
        matched against the regular expression again. Every append and every traced reply
        carries headers, so this runs for most messages an actor sends.
        """
        if not subject:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        if headers is None:
            command = f"PUB {subject} {reply} {payload_size}\r\n".encode() + payload + b"\r\n"
        else:
            lines = ["NATS/1.0\r\n"]
            for name, value in headers.items():
                key = name if name in _CHECKED_HEADER_NAMES else _checked_header_name(name)
                if key:
                    text = value.strip()
                    if "\r" in text or "\n" in text:  # translate() costs ~1 µs, even a no-op
                        text = text.translate(_HEADER_VALUE_NEWLINES)
                    lines.append(f"{key}: {text}\r\n")
            lines.append("\r\n")
            block = "".join(lines).encode()
            if len(block) + payload_size > self._max_payload:
                # nats-py checks the payload alone: sent, the server closes the connection.
                raise nats_errors.MaxPayloadError
            head = f"HPUB {subject} {reply} {len(block)} {len(block) + payload_size}\r\n"
            command = b"".join((head.encode(), block, payload, b"\r\n"))
        if self._write_now(command):
            return
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _write_now(self, command: bytes) -> bool:
        """Write ``command`` to the socket now if it is the first of this loop turn and nothing
        waits ahead of it (nothing queued for nats-py's flusher, nothing unsent in the socket's
        buffer); False, and it is queued as nats-py does, otherwise.

        nats-py queues every message for a flusher task that writes on the next loop turn: a
        request or a reply waits one turn more than it must (~20 µs of CPU and a wake-up per
        message, measured on the runtime's round trip). Writing the first message of a turn at
        once cuts that at low load; under load, every other message of the turn is still
        queued and written in one batch, so a turn costs at most one write more.
        """
        if self._pending or self._wrote_this_turn or not self.is_connected:
            return False
        transport = self._socket()
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            # Closing: the server or the network ended the connection and nats-py's reader has
            # not noticed yet. Queued, the command is sent to the server reconnected to.
            return False
        try:
            transport.write(command)
        except RuntimeError:  # uvloop: the handle closed under us within this turn
            return False
        self._wrote_this_turn = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        self._wrote_this_turn = False

    def _socket(self) -> Any:
        """The asyncio transport under nats-py's (None before a connection)."""
        return getattr(getattr(self._transport, "_io_writer", None), "transport", None)

    def _socket_closing(self) -> bool:
        """Whether the socket is closing under a connection nats-py still says is up (the
        server or the network ended it; nats-py's reader has not seen the end yet)."""
        transport = self._socket()
        return transport is not None and bool(transport.is_closing())

    async def _flusher(self) -> None:
        """nats-py's flusher, which writes nothing while the socket closes: what waits is kept
        for the server reconnected to (nats-py writes it there). nats-py's wrote it into the
        closing socket, where asyncio's transport drops it without a word (uvloop's raises,
        and the flusher stopped: the next flush wrote inline, and raised to the publisher)."""
        assert self._flush_queue is not None, "Client.connect must be called first"
        while True:
            if not self.is_connected or self.is_connecting:
                break
            future: asyncio.Future[Any] = await self._flush_queue.get()
            try:
                if self._pending_data_size > 0 and not self._socket_closing():
                    assert self._transport is not None
                    self._transport.writelines(self._pending[:])
                    self._pending = []
                    self._pending_data_size = 0
                    await self._transport.drain()  # type: ignore[no-untyped-call]
            except OSError as exc:
                await self._error_cb(exc)
                await self._process_op_err(exc)
                break
            except (asyncio.CancelledError, RuntimeError, AttributeError):
                break
            finally:
                if not future.done():
                    future.set_result(None)

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """nats-py's ``_send_ping``, with the commands still queued written before the PING.

        nats-py writes the PING to the socket at once, ahead of what waits for its flusher (a
        ``SUB`` just made, the publishes queued behind the first of a turn): the server could
        answer it before reading them, so ``flush()`` could return before a subscription made
        just before it existed, and a message published then, from any connection, found no
        subscriber and was dropped (an actor's service is "started" after such a flush). Written
        first, everything sent before a ``flush()`` has been read by the server when it returns.
        Not while disconnected: what waits then is for the server reconnected to; nor while
        the socket closes under a connection nats-py has not seen drop yet (uvloop raises on
        any write then): the PONG never comes and ``flush()`` times out, as on a lost network.
        """
        if self._socket_closing():
            self._pongs.append(future if future is not None else asyncio.Future())
            return
        if self._pending and self.is_connected and self._transport is not None:
            self._transport.writelines(self._pending)
            self._pending = []
            self._pending_data_size = 0
        await super()._send_ping(future)

    def permission_violation(self, subject: str, operation: str = "publish") -> str | None:
        """The server's message if it refused this connection ``operation`` on ``subject``."""
        wanted = subject.lower()
        for op, denied, message in reversed(self._violations):
            if op == operation and denied == wanted:
                return message
        return None

    @contextlib.contextmanager
    def denial_watch(
        self, subject: str, event: anyio.Event | asyncio.Future[None]
    ) -> Iterator[None]:
        """Set ``event`` (an Event, or a future to complete) when the server refuses a publish
        or subscription to ``subject`` inside this block."""
        key = subject.lower()
        waiters = self._denial_waiters.setdefault(key, set())
        waiters.add(event)
        try:
            yield
        finally:
            waiters.discard(event)
            if not waiters:
                self._denial_waiters.pop(key, None)

    def _connect_command(self) -> bytes:
        """nats-py's CONNECT (with the credentials), refused when this connection was to use TLS
        and the server did not take it there: nats-py goes on in plain text with a server whose
        INFO does not require TLS, though the URL said ``tls://`` or a CA was configured, and
        sent the user and password to it in the clear (an impostor collected them)."""
        server = self._current_server
        scheme = server.uri.scheme if server is not None else "nats"
        wanted = scheme == "tls" or (
            self.options.get("tls") is not None and scheme not in ("ws", "wss")
        )
        upgraded = bool(self._server_info.get("tls_required")) or bool(
            self.options.get("tls_handshake_first")
        )
        if wanted and not upgraded:
            where = f"{server.uri.hostname}:{server.uri.port}" if server is not None else "?"
            raise TlsNotOffered(
                f"nats: the server at {where} does not require TLS, and this connection is to "
                "use it (a tls:// URL or [nats.tls]): not connecting, so that no credentials "
                "go in the clear; have the server require TLS, or connect with nats://"
            )
        command: bytes = super()._connect_command()
        return command

    async def _process_err(self, err_msg: str) -> None:
        if _MAX_PAYLOAD_VIOLATION in err_msg.lower() and not self.is_connecting:
            # The server closes the connection after it; nats-py then closes the client for
            # good, and every actor on it went deaf, the process still running. Reconnect.
            log.error(
                "nats: the server refused a message past its max_payload (%d bytes) and closed "
                "the connection; reconnecting",
                self._max_payload,
            )
            await self._process_op_err(nats_errors.MaxPayloadError())
            return
        match = _VIOLATION.search(err_msg)
        if match is not None:
            operation, subject = match.group(1), match.group(2)
            message = f"nats: {err_msg.strip(chr(39))}"
            self._violations.append((operation, subject, message))
            for waiter in self._denial_waiters.get(subject, ()):
                if isinstance(waiter, anyio.Event):
                    waiter.set()
                elif not waiter.done():
                    waiter.set_result(None)
            for reply in getattr(self, "_waiters", {}).values():
                if reply.asked.lower() == subject and not reply.done.done():
                    reply.done.set_result(None)
        await super()._process_err(err_msg)

    async def subscribe_raw(
        self, subject: str, handler: RawHandler, *, queue: str = ""
    ) -> Subscription:
        """Subscribe ``handler`` to ``subject`` on the raw fast path (unsubscribe as usual)."""
        return await self._subscribe_raw(subject, handler, queue)

    async def subscribe_raw_batched(
        self, subject: str, handler: Callable[[list[RawMessage]], None], *, queue: str = ""
    ) -> Subscription:
        """:meth:`subscribe_raw`, the messages of each read handed over in one call as a list
        of ``(subject, reply, payload, headers)`` (see :class:`actors.protocol.RawBatch`):
        no Python call per message. For a stream of many small messages (a replay)."""
        return await self._subscribe_raw(subject, RawBatch(handler), queue)

    async def _subscribe_raw(
        self, subject: str, handler: RawHandler | RawBatch, queue: str
    ) -> Subscription:
        if not hasattr(self, "_raw_handlers"):
            self._raw_handlers = {}
        subscription = await self.subscribe(
            subject, queue=queue, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self._raw_handlers[subscription._id] = handler
        return subscription

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handlers = getattr(self, "_raw_handlers", None)
        if handlers:
            handler = handlers.get(sid)
            if type(handler) is RawBatch:
                handler.deliver_alone((subject, reply, data, headers))
                return
            if handler is not None:
                handler(subject, reply, data, headers)
                return
        await super()._process_msg(sid, subject, reply, data, headers)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,  # noqa: ASYNC109 - nats-py's signature
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """nats-py's request, with the reply taken on the raw fast path.

        Same contract (a ``Msg``; ``NoRespondersError``; nats' ``TimeoutError``), but the reply
        is matched to its waiter straight from the protocol reader: no ``Msg`` built for the
        inbox subscription, no per-subscription queue and task hop, no ``wait_for`` task.
        """
        if old_style:
            return await super().request(subject, payload, timeout, old_style, headers)
        prefix = await self._reply_prefix()
        self._next_reply += 1
        token = str(self._next_reply)
        # A publish the server refuses gets -ERR, never a reply: _process_err wakes the waiter.
        # The timeout is a timer that fails the waiter's future; cancelling the caller (an anyio
        # scope, a shutdown) cancels the await as usual.
        loop = asyncio.get_running_loop()
        waiter = self._waiters[token.encode()] = _Reply(subject, loop.create_future())
        timer = loop.call_later(timeout, _expire, waiter.done)
        try:
            await self.publish(subject, payload, reply=f"{prefix}.{token}", headers=headers)
            await waiter.done
        except TimeoutError:
            self._raise_if_denied(subject)
            raise nats_errors.TimeoutError from None
        finally:
            timer.cancel()
            self._waiters.pop(token.encode(), None)
        if not waiter.subject:  # woken by the server's refusal, not by a reply
            self._raise_if_denied(subject)
        return self._reply_message(subject, waiter)

    def _raise_if_denied(self, subject: str) -> None:
        message = self.permission_violation(subject)
        if message is not None:
            raise PermissionDenied(f"NATS refused the request to {subject!r}: {message}")

    def _reply_message(self, subject: str, waiter: _Reply) -> Msg:
        raw = waiter.headers
        if raw and not waiter.data and raw[_STATUS_AT : _STATUS_AT + 3] == b"503":
            raise nats_errors.NoRespondersError
        reply = ReplyMsg(_client=self, subject=waiter.subject, data=waiter.data)
        reply._raw = raw or None
        return reply

    async def _reply_prefix(self) -> str:
        if getattr(self, "_replies_prefix", None) is None:
            self._waiters: dict[bytes, _Reply] = {}
            self._next_reply = 0
            prefix = self.new_inbox()
            await self.subscribe_raw(f"{prefix}.*", self._on_reply)
            self._replies_prefix: str | None = prefix
        assert self._replies_prefix is not None
        return self._replies_prefix

    def _on_reply(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        waiter = self._waiters.get(subject.rpartition(b".")[2])
        if waiter is not None and not waiter.done.done():
            waiter.subject, waiter.data, waiter.headers = subject.decode(), data, headers
            waiter.done.set_result(None)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        getattr(self, "_raw_handlers", {}).pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if not key or len(key.split()) != 1:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


async def connect(options: ConnectOptions) -> Client:
    """Connect with reconnects forever (by default) and loud error callbacks.

    A first connection that the server refuses for good (wrong credentials, a certificate either
    side does not trust) fails at once with that reason rather than after ``initial_deadline``.
    """
    refusal = _Refusal(options.name)
    kwargs: dict[str, Any] = {
        "servers": list(options.servers),
        "name": options.name,
        "connect_timeout": options.connect_timeout,
        "reconnect_time_wait": options.reconnect_wait,
        "max_reconnect_attempts": options.max_reconnect_attempts,
        "allow_reconnect": True,
        "pending_size": options.pending_size,
        "error_cb": refusal.error_cb,
        "disconnected_cb": _disconnected_cb,
        "reconnected_cb": _reconnected_cb,
        # Each user's replies under its own prefix, which the deployment's permissions let
        # only that user receive (docs/operations-cluster.md).
        "inbox_prefix": options.inbox_prefix or _inbox_prefix(options),
    }
    if options.user is not None:
        kwargs["user"], kwargs["password"] = options.user, options.password
    if options.token is not None:
        kwargs["token"] = options.token
    if options.creds_file is not None:
        if not await anyio.Path(options.creds_file).is_file():  # else, no file named
            raise ConfigError(f"nats.creds: no credentials file {options.creds_file}")
        kwargs["user_credentials"] = options.creds_file
    try:
        tls = options.tls_context()
    except (OSError, ssl.SSLError, ValueError) as exc:
        files = [f for f in (options.tls_ca_file, options.tls_cert_file, options.tls_key_file) if f]
        raise ConfigError(
            f"nats.tls: cannot load {', '.join(files)}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    if tls is not None:
        plain = [s for s in options.servers if s.strip().lower().startswith("ws://")]
        if plain:  # a WebSocket's TLS is the URL's (wss://): ws:// went in the clear
            raise ConfigError(
                f"nats.tls: TLS is asked for, but {redact_url(plain[0])} is a plain WebSocket "
                "URL: use wss:// (or leave [nats.tls] out)"
            )
        kwargs["tls"] = tls
    client = Client()
    servers = ", ".join(redact_url(server) for server in options.servers)
    try:
        with anyio.fail_after(options.initial_deadline):
            await refusal.connect(client, kwargs)
    except TimeoutError as exc:
        last = client.last_error
        await _abandon(client)
        raise ConnectionFailed(
            f"cannot connect to NATS at {servers} within {options.initial_deadline} s"
            + (f": {describe(last)}" if last else "")
        ) from exc
    except Exception as exc:
        await _abandon(client)
        raise ConnectionFailed(f"cannot connect to NATS at {servers}: {_cause(exc)}") from exc
    if refusal.error is not None and not client.is_connected:
        await _abandon(client)
        raise ConnectionFailed(f"NATS at {servers} refused the connection: {refusal.reason()}")
    return client


def _cause(exc: BaseException) -> str:
    """What stopped a connection, as said: the one error inside a group of one (a task
    group's "unhandled errors in a TaskGroup (1 sub-exception)" said nothing), with its type."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions[:3])
    return describe(exc)


def _inbox_prefix(options: ConnectOptions) -> str:
    """``_INBOX.<user>`` of the user the connection authenticates as (the URL's user only
    when nothing else names one: never a token's or a credentials file's)."""
    other = options.token is not None or options.creds_file is not None
    return subjects.inbox_prefix(options.user, options.servers, token_or_creds=other)


#: How often the same connection error is said again while it lasts (a reconnect loop).
_REPEAT_S = 30.0
_SAID_MAX = 64  # distinct errors remembered for that


class _Refusal:
    """Watches the first connection for errors that retrying cannot fix, and says the errors
    of the connection once it is up."""

    def __init__(self, name: str | None = None, *, repeat_s: float = _REPEAT_S) -> None:
        self.error: Exception | None = None
        self._refused = anyio.Event()
        self._connecting = True
        self._name = name or "nats"
        self._repeat_s = repeat_s
        # Each error said: when, and how many of it since were not (a reconnect loop goes
        # round a cluster's servers, so the errors alternate); the _SAID_MAX said last.
        self._said: OrderedDict[str, tuple[float, int]] = OrderedDict()

    async def error_cb(self, exc: Exception) -> None:
        if self._connecting and not _is_refusal(exc):
            # A try of the first connection (nats-py tries every half second): the failure,
            # if it lasts, is said once, by the ConnectionFailed that ends it.
            log.debug("nats (%s): %s: %s", self._name, type(exc).__name__, exc)
        else:  # which connection: a process may hold several (an actor's, a reader's)
            self._say(exc)
        if self._connecting and self.error is None and _is_refusal(exc):
            self.error = exc
            self._refused.set()

    def _say(self, exc: Exception) -> None:
        """The error, logged; the same one again (a reconnect try every half second while the
        server is away) at most once per ``repeat_s``, with how many were not said."""
        text = describe(exc)
        now = time.monotonic()
        at, unsaid = self._said.get(text, (None, 0))
        if at is not None and now - at < self._repeat_s:
            self._said[text] = (at, unsaid + 1)
            return
        again = f" (and {unsaid} more since)" if unsaid else ""
        log.error("nats (%s): %s%s", self._name, text, again)
        self._said[text] = (now, 0)
        self._said.move_to_end(text)
        if len(self._said) > _SAID_MAX:  # the one said longest ago: forgotten, said if back
            self._said.popitem(last=False)

    async def connect(self, client: Client, kwargs: dict[str, Any]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cancel_when_refused, tg.cancel_scope)
                await client.connect(**kwargs)
                tg.cancel_scope.cancel()
        finally:
            self._connecting = False

    async def _cancel_when_refused(self, scope: anyio.CancelScope) -> None:
        await self._refused.wait()
        scope.cancel()

    def reason(self) -> str:
        exc = self.error
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted ({text})"
        if isinstance(exc, ssl.SSLError):
            return f"the TLS handshake failed; is our client certificate trusted? ({text})"
        if isinstance(exc, TlsNotOffered):
            return str(exc).removeprefix("nats: ")
        return f"authentication failed: wrong user, password, token or credentials ({text})"


def _is_refusal(exc: Exception) -> bool:
    if isinstance(exc, ssl.SSLError | TlsNotOffered):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


async def _abandon(client: Client) -> None:
    with contextlib.suppress(Exception):
        await client.close()
