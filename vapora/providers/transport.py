"""An HTTP/1.1 keep-alive transport for httpx on asyncio protocols: the provider clients' default.

::

    client = httpx.AsyncClient(transport=KeepAliveTransport(max_connections=256))

Why: at concurrency 64 a provider actor spent 60 % of its CPU in httpx's default transport
(httpcore's pool scans every connection on each request and response, h11 parses one event at
a time, every read is an anyio stream call). This transport keeps httpx's API (the client,
requests, responses, timeouts and exceptions) and replaces only the I/O below it: one
``asyncio.Protocol`` per connection that buffers what arrives, a last-in-first-out pool of idle
connections per origin (no scan), the request head and body written in one call, and response
bodies handed out per network read (a read holding ten SSE events is one chunk, not ten).

What it does: ``http://`` and ``https://`` (TLS by asyncio's ``ssl`` support with a verifying
context, SNI and ALPN ``http/1.1``); Content-Length, chunked and read-until-close response bodies,
streamed; 1xx interim answers skipped; keep-alive unless either side says ``Connection: close``
(or the server speaks HTTP/1.0); idle connections dropped after ``keepalive_expiry`` seconds or
once the server closed them; httpx's four timeouts (``connect``, ``read`` per wait for data,
``write`` while the socket is full, ``pool`` while every connection is busy). Failures are
httpx's exceptions, as the default transport raises them: ``ConnectError``/``ConnectTimeout``,
``ReadTimeout``, ``WriteTimeout``, ``PoolTimeout``, ``ReadError`` (reset),
``RemoteProtocolError`` (malformed answer, or the server closed before the answer was
complete). A connection whose answer was not read to its end is closed, never reused.

What it does not: HTTP/2, proxies, client certificates, ``Expect: 100-continue``, trio (it is
asyncio only, as vapora is). A request is never retried: a provider call is not idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httpx

__all__ = ["SENT_HOOK", "KeepAliveTransport"]

#: A request extension: called with no argument when the request starts going out on its
#: connection (from then on the provider may have it and bill it; before, nothing was sent).
SENT_HOOK = "vapora.sent"

_MAX_HEAD = 64 * 1024
_HIGH_WATER = 1024 * 1024  # pause reading when this much is buffered and unread
_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """A verifying client context (httpx's: certifi's CA bundle), HTTP/1.1 by ALPN; built once."""
    context = httpx.create_ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
    return timeouts


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: buffers what arrives and wakes the one reader waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.lost: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, hence no check).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too: HTTP/1.1 has no use for a half-open connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- used by the transport --------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def consumed(self) -> None:
        """The reader took data out of :attr:`buffer`: resume reading if it was paused."""
        if self._reading_paused and len(self.buffer) < _HIGH_WATER // 2:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    async def wait_for_data(self, limit: float | None) -> None:
        """Wait until more data arrives or the connection is lost (``ReadTimeout`` after
        ``limit`` seconds). A timer on the future, not a cancel scope: the wait is ours, and
        the timer costs a fraction of a scope."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = (
            self._loop.call_later(limit, _expire, waiter, httpx.ReadTimeout, "read")
            if limit is not None
            else None
        )
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def write(self, data: bytes, limit: float | None) -> None:
        if self.closed or self.transport is None:
            raise httpx.WriteError("connection closed")
        self.transport.write(data)
        writable = self._writable
        if writable is None:
            return
        timer = (
            self._loop.call_later(limit, _expire, writable, httpx.WriteTimeout, "write")
            if limit is not None
            else None
        )
        try:
            await writable
        finally:
            if timer is not None:
                timer.cancel()
        if self.closed:
            raise httpx.WriteError("connection closed while writing")

    def reusable(self, now: float, expiry: float) -> bool:
        return (
            not self.closed
            and not self.buffer
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < expiry
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # an unfinished answer: nothing of it may be read later


def _expire(future: asyncio.Future[None], error: type[httpx.TimeoutException], what: str) -> None:
    """A timer's end: fail the wait (the error is made only when a timer fires)."""
    if not future.done():
        future.set_exception(error(f"{what} timed out"))


class _Pool:
    """The connections to one origin: idle ones last-in first-out, a bound on the total."""

    def __init__(
        self,
        origin: tuple[bytes, str, int],
        max_connections: int,
        keepalive_expiry: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.scheme, self.host, self.port = origin
        self.tls = tls
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.idle: list[_Connection] = []
        self.count = 0
        self.closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, timeouts: dict[str, float | None]) -> _Connection:
        while True:
            now = time.monotonic()
            while self.idle:
                connection = self.idle.pop()
                if connection.reusable(now, self.keepalive_expiry):
                    return connection
                self._discard(connection)
            if self.count < self.max_connections:
                self.count += 1
                try:
                    return await self._connect(timeouts.get("connect"))
                except BaseException:
                    self.count -= 1
                    self._wake_one()
                    raise
            await self._wait(timeouts.get("pool"))

    async def _wait(self, limit: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = (
            loop.call_later(limit, _expire, waiter, httpx.PoolTimeout, "pool")
            if limit is not None
            else None
        )
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self, limit: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self.scheme == b"https"
        try:
            async with asyncio.timeout(limit):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=(self.tls or _tls_context()) if tls else None,
                    server_hostname=self.host if tls else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        if reusable and not connection.closed and not self.closed:
            connection.idle_since = time.monotonic()
            self.idle.append(connection)
        else:
            self._discard(connection)
        self._wake_one()

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self.count -= 1

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections now, the busy ones when their answer is done."""
        self.closed = True
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class _Head:
    __slots__ = ("chunked", "headers", "keep_alive", "length", "reason", "status")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = True


def _parse_head(raw: bytes) -> _Head:
    """A response's status line and headers (``raw`` without its final blank line)."""
    lines = raw.split(_CRLF)
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        # The peer's bytes are not quoted: a server may echo the request's headers (the API
        # key) into them, and a piece of a key cut off is past any scrubbing of it.
        raise httpx.RemoteProtocolError(f"malformed status line ({len(lines[0])} bytes)")
    head = _Head()
    head.status, head.reason = int(code), reason
    head.keep_alive = version == b"HTTP/1.1"
    headers = head.headers
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise httpx.RemoteProtocolError(f"malformed header line ({len(line)} bytes)")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or (head.length is not None and head.length != int(value)):
                raise httpx.RemoteProtocolError("malformed Content-Length")
            head.length = int(value)
        elif lower == b"transfer-encoding":
            head.chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        elif lower == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"close" in tokens:
                head.keep_alive = False
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                head.keep_alive = True
    if head.chunked:
        head.length = None  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
    return head


class _Body(httpx.AsyncByteStream):
    """A response body, read from the connection as it arrives: one chunk per network read."""

    def __init__(
        self,
        pool: _Pool,
        connection: _Connection,
        head: _Head,
        read_timeout: float | None,
        *,
        empty: bool,
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._timeout = read_timeout
        self._keep_alive = head.keep_alive
        self._chunked = head.chunked
        self._remaining = 0 if empty else head.length  # None: until the connection closes
        self._chunk_left = 0  # chunked: data bytes left in the current chunk
        self._state = _SIZE  # chunked: what the buffer starts with
        self._done = empty
        self._released = False
        if empty:
            self._release()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while not self._done:
                data = self._take()
                if data:
                    yield data
                elif not self._done:
                    await self._more()
        finally:
            if not self._done:
                self._release()

    async def aclose(self) -> None:
        self._release()

    async def _more(self) -> None:
        connection = self._connection
        if connection.closed:
            if self._remaining is None and not self._chunked:
                self._done = True  # a body delimited by the end of the connection
                self._keep_alive = False
                self._release()
                return
            raise _closed_error(connection.lost, "before the end of the response body")
        await connection.wait_for_data(self._timeout)

    def _take(self) -> bytes:
        """The body bytes now in the buffer (removed from it); marks the end when reached."""
        buffer = self._connection.buffer
        if not buffer:
            return b""
        if self._chunked:
            data = self._take_chunked(buffer)
        elif self._remaining is None:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[: self._remaining])
            del buffer[: self._remaining]
            self._remaining -= len(data)
            if self._remaining == 0:
                self._finish()
        self._connection.consumed()
        return data

    def _take_chunked(self, buffer: bytearray) -> bytes:
        out: list[bytes] = []
        position = 0
        size = len(buffer)
        while position < size and not self._done:
            if self._state == _DATA:
                take = min(self._chunk_left, size - position)
                out.append(bytes(buffer[position : position + take]))
                position += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._state = _DATA_END
            else:
                end = buffer.find(_CRLF, position)
                if end < 0:
                    if size - position > _MAX_HEAD:
                        raise httpx.RemoteProtocolError("chunked body: line too long")
                    break
                line = bytes(buffer[position:end])
                position = end + 2
                self._chunk_line(line)
        del buffer[:position]
        if self._done:
            self._release()  # after the delete: a connection with bytes left is not reused
        return b"".join(out)

    def _chunk_line(self, line: bytes) -> None:
        if self._state == _SIZE:
            digits = line.split(b";", 1)[0].strip()
            try:
                self._chunk_left = int(digits, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(
                    f"malformed chunk size ({len(line)} bytes)"
                ) from None
            if self._chunk_left < 0:
                raise httpx.RemoteProtocolError("malformed chunk size")
            self._state = _DATA if self._chunk_left else _TRAILER
        elif self._state == _DATA_END:
            if line:
                raise httpx.RemoteProtocolError("chunk data longer than its size")
            self._state = _SIZE
        elif not line:  # _TRAILER: the blank line ending the trailers ends the body
            self._done = True

    def _finish(self) -> None:
        self._done = True
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        connection = self._connection
        reusable = self._done and self._keep_alive and not connection.buffer
        if not reusable:
            connection.close()
        self._pool.release(connection, reusable=reusable)


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


def _closed_error(lost: BaseException | None, when: str) -> httpx.TransportError:
    if isinstance(lost, OSError):
        return httpx.ReadError(f"{type(lost).__name__}: {lost} ({when})")
    return httpx.RemoteProtocolError(f"server closed the connection {when}")


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive over asyncio protocols (see the module docstring).

    ``max_connections`` bounds the connections per origin (scheme, host, port);
    ``keepalive_expiry`` is how long an idle connection is kept (httpx's default, 5 s);
    ``ssl_context`` replaces the default verifying context (httpx's, with certifi's CAs).
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._tls = ssl_context
        self._pools: dict[tuple[bytes, str, int], _Pool] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
        origin = (scheme, url.host, url.port or (443 if scheme == b"https" else 80))
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(
                origin, self.max_connections, self.keepalive_expiry, self._tls
            )
        timeouts = _timeouts(request)
        message = await _request_bytes(request)
        connection = await pool.acquire(timeouts)
        sent = request.extensions.get(SENT_HOOK)
        if sent is not None:
            sent()
        try:
            await connection.write(message, timeouts.get("write"))
            head = await _read_head(connection, timeouts.get("read"))
        except BaseException:
            connection.close()
            pool.release(connection, reusable=False)
            raise
        empty = (
            request.method == "HEAD" or head.status in _NO_BODY_STATUS or head.status < 200
        ) or (head.length == 0 and not head.chunked)
        body = _Body(pool, connection, head, timeouts.get("read"), empty=empty)
        return httpx.Response(
            head.status,
            headers=head.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


async def _request_bytes(request: httpx.Request) -> bytes:
    """The request's head and body as one message (a streamed body is read first)."""
    try:
        body = request.content
    except httpx.RequestNotRead:
        body = await request.aread()
    url = request.url
    target = url.raw_path or b"/"
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    chunked = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        lines.append(name + b": " + value)
    if chunked:
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    return _CRLF.join(lines) + _HEAD_END + body


async def _read_head(connection: _Connection, limit: float | None) -> _Head:
    """The response head, skipping 1xx interim answers (the buffer keeps what follows it)."""
    buffer = connection.buffer
    searched = 0
    while True:
        end = buffer.find(_HEAD_END, max(searched - 3, 0))
        if end >= 0:
            head = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if 100 <= head.status < 200 and head.status != 101:
                searched = 0
                continue
            return head
        searched = len(buffer)
        if searched > _MAX_HEAD:
            raise httpx.RemoteProtocolError("response head too large")
        if connection.closed:
            raise _closed_error(connection.lost, "without sending a complete response head")
        await connection.wait_for_data(limit)
