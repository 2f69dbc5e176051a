"""The replay reader's reading of JetStream reply subjects: sequences and the pending count, in
both formats the server uses, for contiguous batches and for batches with gaps (filtered)."""

from __future__ import annotations

from datetime import UTC, datetime

from actors.eventlog import _ack_tokens, _batch, _PullReader, _sequences
from events.codec import decode_events, encode
from events.log import BudgetReleased


def v1(seq: int, pending: int) -> bytes:
    return f"$JS.ACK.VAPORA.c0nsumer.1.{seq}.{seq}.1795677248172322729.{pending}".encode()


def v2(seq: int, pending: int) -> bytes:  # with a domain and an account hash, and a token
    ts = 1795677248172322729
    return f"$JS.ACK.hub.ACCHASH.VAPORA.c0nsumer.1.{seq}.{seq}.{ts}.{pending}.x7".encode()


def test_sequence_and_pending_in_both_reply_formats() -> None:
    assert _ack_tokens(v1(1205, 37)) == (1205, 37)
    assert _ack_tokens(v2(1205, 37)) == (1205, 37)
    assert _ack_tokens(v2(9, 0)) == (9, 0)


def batch(seqs: list[int], reply=v1) -> list[tuple[bytes, bytes, bytes, bytes | None]]:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        (
            b"vapora.events.budget",
            reply(seq, 100 - i),
            encode(
                BudgetReleased(
                    id=f"e{seq}", at=at, task_id="t", reservation_id=f"r{seq}", reason="failed"
                )
            ),
            None,
        )
        for i, seq in enumerate(seqs)
    ]


def unexpected(seq: int, subject: str, problem: str) -> None:
    raise AssertionError(f"sequence {seq} ({subject}) read as unreadable: {problem}")


def test_a_contiguous_batch_and_a_batch_with_gaps_get_their_own_sequences() -> None:
    assert list(_sequences(batch([5, 6, 7, 8]))) == [5, 6, 7, 8]
    assert list(_sequences(batch([5, 9, 10, 11]))) == [5, 9, 10, 11]  # filtered: gaps
    assert list(_sequences(batch([5, 6, 8, 9], reply=v2))) == [5, 6, 8, 9]
    entries = _batch(batch([3, 4, 40]), decode_events, unexpected).entries()
    assert [(e.seq, e.event.id) for e in entries] == [(3, "e3"), (4, "e4"), (40, "e40")]


def test_the_reader_is_caught_up_only_when_nothing_is_pending() -> None:
    for reply in (v1, v2):
        reader = _PullReader()
        reader.outstanding = 1
        reader.on_batch([(b"s", reply(1, 10), b"{}", None)])
        reader.on_batch([(b"s", reply(2, 100), b"{}", None)])  # "...100" is not nothing pending
        assert not reader.caught_up
        reader.on_batch([(b"s", reply(3, 1), b"{}", None), (b"s", reply(4, 0), b"{}", None)])
        assert reader.caught_up
        assert [m[1] for m in reader.buffer] == [
            reply(n, p) for n, p in ((1, 10), (2, 100), (3, 1), (4, 0))
        ]


def test_a_pull_request_ends_after_its_batch_or_at_a_status() -> None:
    reader = _PullReader()
    reader.outstanding = 2
    full = [(b"s", v1(n, 9000 - n), b"{}", None) for n in range(1, 4097)]
    reader.on_batch(full[:3000])
    assert reader.outstanding == 2
    reader.on_batch([*full[3000:], (b"s", v1(4097, 10), b"{}", None)])  # one request is done
    assert (reader.outstanding, reader.in_request) == (1, 1)
    reader.on_batch([(b"s", b"", b"", b"NATS/1.0 404 No Messages\r\n\r\n")])  # the next one
    assert (reader.outstanding, reader.in_request) == (0, 0)
    assert len(reader.buffer) == 4097  # the status is not a message of the log
