"""A small, fast HTTP/1.1 server on asyncio's protocol API: keep-alive and chunked responses.

Why hand-written: the simulator must answer thousands of requests per second for benchmarks with
almost no per-request overhead, and needs precise control over the wire (cutting a chunked stream
midway, hanging, writing a malformed body) that a full framework hides. A request whose answer is
ready at once is written synchronously from ``data_received`` with no task at all; only answers
that wait (latency, streams with pacing, hangs) run as a task, which the connection owns and
cancels when the peer goes away or the server stops. Protocol callbacks are synchronous, which is
why those tasks are created on the loop directly rather than in an anyio task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

__all__ = ["Connection", "Cut", "HTTPServer", "Request", "response_bytes"]

_log = logging.getLogger("vapora.simulator")
_MAX_HEAD = 64 * 1024
_MAX_BODY = 32 * 1024 * 1024
_REASONS = {s.value: s.phrase for s in HTTPStatus} | {529: "Overloaded"}


@dataclass(slots=True)
class Request:
    """One parsed request; header names are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Cut:
    """An answer written as is, after which the connection is closed (a stream cut midway)."""

    data: bytes


Answer = bytes | Cut | Coroutine[Any, Any, None]
App = Callable[[Request, "Connection"], Answer]


def response_bytes(
    status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool = False
) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length."""
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-length: {len(body)}"]
    head.extend(f"{name}: {value}" for name, value in headers)
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One client connection: parses requests in order and writes their answers."""

    def __init__(self, app: App, server: HTTPServer) -> None:
        self._app = app
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (asyncio's or uvloop's, which does not subclass asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._serve_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        self._writable.set()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- used by handlers -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write raw bytes (ignored once the peer has gone)."""
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer has room."""
        await self._writable.wait()

    def start_chunked(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Write the head of a chunked response."""
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "transfer-encoding: chunked"]
        head.extend(f"{name}: {value}" for name, value in headers)
        self.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

    async def send_chunk(self, data: bytes) -> None:
        """Write one chunk of a chunked body."""
        self.write(b"%x\r\n%b\r\n" % (len(data), data))
        await self.drain()

    def end_chunked(self) -> None:
        self.write(b"0\r\n\r\n")

    def close(self) -> None:
        """Close after flushing what was written (a cut stream: no terminating chunk)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # --- internals --------------------------------------------------------------------------

    def _serve_buffered(self) -> None:
        while not self.closed:
            try:
                request = self._parse()
            except ValueError as exc:
                self.write(response_bytes(400, [], str(exc).encode(), close=True))
                self.close()
                return
            if request is None:
                return
            answer = self._app(request, self)
            if isinstance(answer, bytes):
                self.write(answer)
                if not request.keep_alive:
                    self.close()
            elif isinstance(answer, Cut):
                self.write(answer.data)
                self.close()
            else:
                self._task = asyncio.get_running_loop().create_task(self._run(answer, request))
                self._server.tasks.add(self._task)
                self._task.add_done_callback(self._server.tasks.discard)
                return

    async def _run(self, handler: Awaitable[None], request: Request) -> None:
        try:
            await handler
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            _log.exception("simulator handler failed for %s %s", request.method, request.path)
            self.close()
        self._task = None
        if not request.keep_alive:
            self.close()
        elif not self.closed and self._buffer:
            self._serve_buffered()

    def _parse(self) -> Request | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                raise ValueError("request head too large")
            return None
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        method, target, version = _request_line(lines[0])
        headers = _headers(lines[1:])
        body_start = end + 4
        parsed = self._body(headers, body_start)
        if parsed is None:
            return None
        body, consumed = parsed
        del self._buffer[:consumed]
        path, _, query = target.partition("?")
        return Request(method, unquote(path), query, headers, body, _keep_alive(version, headers))

    def _body(self, headers: dict[str, str], start: int) -> tuple[bytes, int] | None:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return _dechunk(self._buffer, start)
        length = int(headers.get("content-length", "0") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError("bad content-length")
        if len(self._buffer) < start + length:
            return None
        return bytes(self._buffer[start : start + length]), start + length


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    return parts[0], parts[1], parts[2]


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers[name.strip().lower()] = value.strip()
    return headers


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked request body, or None while it is incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buffer[pos:eol]).split(b";")[0] or b"0", 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)
            if trailer_end < 0 and buffer[eol : eol + 4] != b"\r\n\r\n":
                return None
            return bytes(body), (trailer_end if trailer_end >= 0 else eol) + 4
        if len(buffer) < eol + 2 + size + 2:
            return None
        body += buffer[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


class HTTPServer:
    """Listens on host:port and serves ``app``; ``port`` is known after :meth:`start`."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self._app, self), self._host, self._port, reuse_address=True
        )

    async def stop(self) -> None:
        """Stop listening, cancel waiting answers and close every connection."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self.tasks):
            task.cancel()
        for connection in list(self.connections):
            connection.close()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
