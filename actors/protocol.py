"""A faster reader for the NATS protocol's message frames (``MSG`` and ``HMSG``).

nats-py's parser matches two regular expressions and copies the buffer twice per message; on a
replay that was the largest remaining cost per event. This parser finds each message frame's
control line with one byte search and splits it at its whitespace (half the cost of matching a
pattern; the same lines accepted), slices the payload out of the bytes as read (one copy, no
intermediate ``bytearray``), and hands a raw-path subscription's message straight to its
handler. A frame cut by the end of a read waits in the buffer (a long payload is accumulated,
never copied again per read). Every other protocol line (``INFO``, ``PING``, ``PONG``, ``+OK``,
``-ERR``) is handed to nats-py's own parser unchanged, so only the frame decoding differs and it
yields exactly the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

__all__ = ["FastParser", "RawBatch", "RawMessage"]

# A message on the raw path: (subject, reply, payload, raw headers or None).
RawMessage = tuple[bytes, bytes, bytes, bytes | None]


class RawBatch(list[RawMessage]):
    """A batched raw-path subscription's messages of one read, handed over at once.

    The parser appends each message (no call per message) and, when it has gone through a read
    or before it awaits anything, calls ``handler`` with the list and empties it: the handler
    copies what it keeps. A message without a reply subject (a server status) comes alone, in a
    batch of its own, after the ones before it.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[list[RawMessage]], None]) -> None:
        super().__init__()
        self.handler = handler

    def flush(self) -> None:
        if self:
            try:
                self.handler(self)
            finally:
                self.clear()

    def deliver_alone(self, message: RawMessage) -> None:
        """Hand ``message`` over in a batch of its own, after what is waiting."""
        self.flush()
        self.handler([message])


_CRLF = b"\r\n"
_MAX_CONTROL_LINE = 4096  # nats-server's own limit on a protocol line


class FastParser(Parser):
    """nats-py's :class:`Parser` with a fast path for message frames."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        if self.state == AWAITING_MSG_PAYLOAD and len(buf) + len(data) < self.needed + 2:
            # A long payload arrives over many reads: accumulate until the frame is whole.
            buf.extend(data)
            return
        if buf:  # the end of a frame cut by the last read, usually short: one copy
            data = bytes(buf) + data
            buf.clear()
        nc = self.nc
        process = nc._process_msg
        # Messages for raw-path subscriptions go straight to their handler (a plain call): no
        # coroutine per message. Everything else takes nats-py's ``_process_msg`` as before.
        raw_handlers: dict[int, Any] = getattr(nc, "_raw_handlers", None) or {}
        size = len(data)
        pos = 0
        touched: list[RawBatch] = []  # batched subscriptions with messages waiting
        if self.state == AWAITING_MSG_PAYLOAD:  # the frame begun in an earlier read is whole
            header_size, end = self.header_needed, self.needed
            arg = self.msg_arg
            self.header_needed = 0
            self.state = AWAITING_CONTROL_LINE
            pos = end + 2
            await self._deliver(
                raw_handlers,
                arg["sid"],
                arg["subject"],
                arg["reply"],
                data[header_size:end],
                data[:header_size] if header_size else None,
            )
            if self.buf is not buf:  # the client reset the parser (reconnect)
                return
        while pos < size:
            # The control line, split at its whitespace as nats-py's patterns allow (a subject
            # holds no CR): HMSG <subject> <sid> [reply] <hsize> <size> | MSG ... [reply] <size>
            line_end = data.find(b"\r", pos)
            if line_end < 0 or line_end + 1 >= size:
                break  # cut by the end of the read (or another line: nats-py's parser below)
            parts = data[pos:line_end].split()
            fields = len(parts)
            try:
                if parts[0] == b"HMSG" and 5 <= fields <= 6:
                    subject, sid = parts[1], int(parts[2])
                    reply = parts[3] if fields == 6 else b""
                    header_size, total = int(parts[-2]), int(parts[-1])
                elif parts[0] == b"MSG" and 4 <= fields <= 5:
                    subject, sid = parts[1], int(parts[2])
                    reply = parts[3] if fields == 5 else b""
                    header_size, total = 0, int(parts[-1])
                else:
                    break  # not a message frame: nats-py's parser below
            except (IndexError, ValueError):
                break  # malformed: nats-py's parser below refuses it as it would
            if data[line_end + 1] != 10 or not 0 <= header_size <= total:  # 10: "\n"
                break
            start = line_end + 2
            end = start + total
            if end + 2 > size:  # the payload is still arriving
                self.msg_arg["subject"] = subject
                self.msg_arg["sid"] = sid
                self.msg_arg["reply"] = reply
                self.header_needed = header_size
                self.needed = end - start
                self.state = AWAITING_MSG_PAYLOAD
                pos = start
                break
            pos = end + 2
            payload = data[start + header_size : end]
            headers = data[start : start + header_size] if header_size else None
            handler = raw_handlers.get(sid)
            if handler is not None:
                if type(handler) is not RawBatch:
                    handler(subject, reply, payload, headers)
                elif reply:
                    if not handler:
                        touched.append(handler)
                    handler.append((subject, reply, payload, headers))
                else:  # a status comes alone, after what came before it
                    handler.deliver_alone((subject, reply, payload, headers))
                continue
            for batch in touched:  # everything before this message, before anything awaits
                batch.flush()
            touched.clear()
            await process(sid, subject, reply, payload, headers)
            if self.buf is not buf:  # the client reset the parser (reconnect)
                return
        for batch in touched:
            batch.flush()
        if pos < size:
            buf.extend(data[pos:] if pos else data)
        if buf and self.state == AWAITING_CONTROL_LINE:
            if buf.startswith((b"HMSG ", b"MSG ")) and _CRLF not in buf:
                # A frame's control line cut by the end of the read: wait for the rest.
                if len(buf) > _MAX_CONTROL_LINE:
                    raise ProtocolError("nats: malformed MSG")
                return
            # Any other line, or a frame not taken above: nats-py's parser handles it, or
            # raises its ProtocolError.
            await super().parse()

    async def _deliver(
        self,
        raw_handlers: dict[int, Any],
        sid: int,
        subject: bytes,
        reply: bytes,
        payload: bytes,
        headers: bytes | None,
    ) -> None:
        handler = raw_handlers.get(sid)
        if handler is None:
            await self.nc._process_msg(sid, subject, reply, payload, headers)
        elif type(handler) is RawBatch:
            handler.deliver_alone((subject, reply, payload, headers))
        else:
            handler(subject, reply, payload, headers)
