"""The fast protocol parser yields exactly what nats-py's own parser yields, however the bytes
are cut into reads, and refuses what it refuses."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from actors.protocol import FastParser, RawBatch

RAW_SID = 7  # delivered on the raw path (a plain call), as replays and acks are


class Recorder:
    """Stands in for the client: records what the parser hands it, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self._raw_handlers = {RAW_SID: self.raw}

    def raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.seen.append(("msg", RAW_SID, subject, reply, data, headers))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", json.dumps(info, sort_keys=True)))

    async def _process_err(self, text: str) -> None:
        self.seen.append(("err", text))


def frame(subject: str, sid: int, payload: bytes, reply: str = "", headers: bytes = b"") -> bytes:
    reply_part = f" {reply}" if reply else ""
    if headers:
        head = f"HMSG {subject} {sid}{reply_part} {len(headers)} {len(headers) + len(payload)}"
        return head.encode() + b"\r\n" + headers + payload + b"\r\n"
    return f"MSG {subject} {sid}{reply_part} {len(payload)}".encode() + b"\r\n" + payload + b"\r\n"


HEADERS = b"NATS/1.0\r\nNats-Msg-Id: r47a\r\ntraceparent: 00-ab-cd-01\r\n\r\n"


def stream(big: int) -> bytes:
    """Every kind of line the server sends, with one payload of ``big`` bytes."""
    return b"".join(
        [
            b'INFO {"server_id":"x","max_payload":1048576}\r\n',
            frame(
                "vapora.events.budget",
                RAW_SID,
                b'{"type":"budget_reserved"}',
                "$JS.ACK.S.c.1.5.5.9.0",
            ),
            frame("a.b", 3, b"hello"),
            b"PING\r\n",
            frame("a.b", 3, b"", "_INBOX.x.1"),
            frame("a.b", RAW_SID, b"payload with \r\nMSG a 1 5\r\n inside", headers=HEADERS),
            b"+OK\r\n",
            frame("c", 4, b"x" * big, "r", headers=HEADERS),
            b"PONG\r\n",
            frame("d", RAW_SID, b"", "", headers=b"NATS/1.0 503\r\n\r\n"),
            b"MSG  spaced.subject \t 3  5\r\nhello\r\n",  # nats-py accepts runs of whitespace
            b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n",
            frame("e", 3, b"last"),
        ]
    )


STREAM = stream(70_000)


async def feed(parser: Parser, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await parser.parse(chunk)


def parse_with(kind: type[Parser], chunks: list[bytes]) -> list[tuple[Any, ...]]:
    recorder = Recorder()
    asyncio.run(feed(kind(recorder), chunks))
    return recorder.seen


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def test_whole_stream_in_one_read_matches_nats_py() -> None:
    expected = parse_with(Parser, [STREAM])
    assert len([s for s in expected if s[0] == "msg"]) == 8  # the stream is what it says
    assert parse_with(FastParser, [STREAM]) == expected


def test_every_single_cut_point_matches_nats_py() -> None:
    """Every place a read can end: inside a control line, a header block, a payload, a CRLF."""
    small = stream(700)
    expected = parse_with(Parser, [small])
    for point in range(1, len(small)):
        assert parse_with(FastParser, cut(small, [point])) == expected, point


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_any_chunking_matches_nats_py(points: list[int]) -> None:
    expected = parse_with(Parser, [STREAM])
    assert parse_with(FastParser, cut(STREAM, points)) == expected


def test_byte_by_byte_reads_match_nats_py() -> None:
    data = b"".join(frame(f"s.{i}", RAW_SID if i % 2 else 3, b"p" * i, "r") for i in range(30))
    expected = parse_with(Parser, [data])
    assert parse_with(FastParser, [data[i : i + 1] for i in range(len(data))]) == expected


def test_random_large_batches_match_nats_py() -> None:
    rng = random.Random(7)
    data = b"".join(
        frame(
            "vapora.events.spend.claude",
            RAW_SID,
            rng.randbytes(rng.randrange(0, 600)),
            "r",
            HEADERS,
        )
        for _ in range(2_000)
    )
    expected = parse_with(Parser, [data])
    reads, pos = [], 0
    while pos < len(data):
        size = rng.choice([1, 7, 4096, 32768, 262_144])
        reads.append(data[pos : pos + size])
        pos += size
    assert parse_with(FastParser, reads) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"HMSG subject notanumber 10 20\r\n",
        b"MSG subject 1 reply extra 5\r\n",
        b"HMSG a 1 x\r\n",
    ],
)
def test_a_malformed_frame_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_with(FastParser, [line + b"hello\r\n"])


def test_a_control_line_that_never_ends_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_with(FastParser, [b"HMSG " + b"s" * 5000])


def test_a_cut_control_line_waits_for_the_rest() -> None:
    recorder = Recorder()
    parser = FastParser(recorder)
    data = frame("a", 3, b"hello", "r")
    asyncio.run(parser.parse(data[:6]))
    assert recorder.seen == []
    asyncio.run(parser.parse(data[6:]))
    assert recorder.seen == [("msg", 3, b"a", b"r", b"hello", None)]


class BatchRecorder(Recorder):
    """The raw subscription batched: each read's messages in one call."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[Any, ...]]] = []
        self._raw_handlers = {RAW_SID: RawBatch(self.batch)}  # type: ignore[dict-item]

    def batch(self, messages: list[tuple[bytes, bytes, bytes, bytes | None]]) -> None:
        self.batches.append(list(messages))
        self.seen.extend(("msg", RAW_SID, *message) for message in messages)


def parse_batched(chunks: list[bytes]) -> BatchRecorder:
    recorder = BatchRecorder()
    asyncio.run(feed(FastParser(recorder), chunks))
    return recorder


def only(sid: int, seen: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [s for s in seen if s[0] == "msg" and s[1] == sid]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_a_batched_subscription_gets_the_same_messages_in_order(points: list[int]) -> None:
    expected = parse_with(Parser, [STREAM])
    recorder = parse_batched(cut(STREAM, points))
    assert only(RAW_SID, recorder.seen) == only(RAW_SID, expected)
    # Everything else still arrives message by message, in order.
    others = [s for s in recorder.seen if not (s[0] == "msg" and s[1] == RAW_SID)]
    assert others == [s for s in expected if not (s[0] == "msg" and s[1] == RAW_SID)]


def test_a_read_is_one_batch_and_a_status_comes_alone() -> None:
    data = b"".join(frame(f"s.{i}", RAW_SID, b"p", f"r.{i}") for i in range(5))
    status = frame("s.x", RAW_SID, b"", "", headers=b"NATS/1.0 404 No Messages\r\n\r\n")
    after = frame("s.y", RAW_SID, b"q", "r.y")
    recorder = parse_batched([data + status + after, data])
    assert [len(b) for b in recorder.batches] == [5, 1, 1, 5]
    assert recorder.batches[1][0][1] == b"" and recorder.batches[1][0][3].startswith(
        b"NATS/1.0 404"
    )


# --- one header read from a received header block --------------------------------------------

_NAMES = ["traceparent", "Nats-Service-Error-Code", "Vapora-Route-Reason", "Nats-Msg-Id", "x"]


def _block(lines: list[bytes], status: bytes = b"", last_crlf: bool = True) -> bytes:
    block = b"NATS/1.0" + status + b"\r\n" + b"\r\n".join(lines)
    return block + b"\r\n\r\n" if last_crlf else block


_VALUES = st.one_of(
    st.text(alphabet="ab: -é\t", max_size=12).map(str.encode),
    st.sampled_from(_NAMES).map(str.encode),  # a name inside a value
    st.binary(max_size=8).filter(lambda b: b"\r" not in b and b"\n" not in b),  # not UTF-8
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*_NAMES, " x", "x ", "Vapora-Route-Reasonable", "a b", "é"]),
            st.sampled_from([":", ": ", " : ", ":  "]),
            _VALUES,
        ),
        max_size=5,
    ),
    st.sampled_from([*_NAMES, " x", "a b", "é", "x ", "a\x1cb", ""]),
    st.sampled_from([b"", b" 503", b" 408 Request Timeout"]),
    st.booleans(),
)
def test_one_header_read_from_the_block_is_what_the_full_parse_gives(
    fields: list[tuple[str, str, bytes]], wanted: str, status: bytes, last_crlf: bool
) -> None:
    from actors.connection import Client, raw_header

    lines = [name.encode() + sep.encode() + value for name, sep, value in fields]
    block = _block(lines, status, last_crlf)
    parsed = Client._parse_header_lines(block[block.find(b"\r\n") :])
    assert raw_header(block, wanted) == parsed.get(wanted)
    assert raw_header(None, wanted) is None and raw_header(b"", wanted) is None


def test_a_reply_parses_its_headers_only_when_they_are_read() -> None:
    from nats.aio.msg import Msg

    from actors.connection import Client, ReplyMsg, header

    block = _block([b"traceparent: 00-ab-cd-01", b"Nats-Service-Error-Code: 503"])
    reply = ReplyMsg(_client=None, subject="_INBOX.x", data=b"{}")  # type: ignore[arg-type]
    reply._raw = block
    assert reply._parsed is None
    assert header(reply, "Nats-Service-Error-Code") == "503"
    assert header(reply, "absent") is None
    assert reply._parsed is None  # one header read: still unparsed
    expected = Client._parse_header_lines(block[block.find(b"\r\n") :])
    assert reply.headers == expected and reply._parsed == expected
    assert header(reply, "traceparent") == "00-ab-cd-01"
    reply.headers = {"k": "v"}  # assignable, as a Msg's are
    assert header(reply, "k") == "v" and reply.headers == {"k": "v"}
    reply.headers = None  # replaced by nothing: the block is not read again
    assert reply.headers is None and header(reply, "traceparent") is None
    empty = ReplyMsg(_client=None, subject="s")  # type: ignore[arg-type]
    assert empty.headers is None and header(empty, "k") is None
    plain = Msg(_client=None, subject="s", headers={"k": "v"})  # type: ignore[arg-type]
    assert header(plain, "k") == "v"
