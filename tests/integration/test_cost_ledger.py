"""The cost ledger on a real nats-server: every event exactly once across restarts, reports over
``vapora.report``, and the money commands (``report``, ``budget``, ``audit``, ``events``)."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from actors.budget_keeper import BudgetKeeper
from actors.connection import Client
from actors.cost_ledger import LEDGER_FILE, CostLedger
from events import subjects
from events.codec import encode
from events.contract import CostReport, ReportRequest
from events.log import FallbackTriggered, SpendRecorded
from tests.fault.money import (
    FakeClock,
    ask,
    config,
    eventually,
    exact_usage,
    read_log,
    reserve,
    running,
    runtime,
    spend,
    status,
    total_spend,
    usage_costing_at_most,
)
from vapora import ledger as ledger_module
from vapora.cli import money as commands_money
from vapora.cli.money import audit_command, budget_command, events_command, report_command
from vapora.errors import ConfigError, InvalidRequest, NoProviderAvailable
from vapora.ledger import Ledger

pytestmark = pytest.mark.anyio


async def _refusal_to_start(rt: Any) -> ConfigError:
    """The ConfigError a ledger on ``rt`` refuses to start with (another stream's file)."""
    refused: list[ConfigError] = []
    try:
        async with running(CostLedger(rt)):
            pytest.fail("the ledger started on another stream")
    except* ConfigError as group:
        refused += group.exceptions  # type: ignore[arg-type]
    [error] = refused
    return error


async def _caught_up(ledger: CostLedger) -> bool:
    return ledger.position == await ledger.log.last_sequence()


async def _paid_calls(nc: Client, clock: FakeClock, n: int, seed: int = 1) -> list[SpendRecorded]:
    """``n`` reserved and settled calls, plus a fallback event now and then."""
    rng, spent = random.Random(seed), []
    log = runtime(nc, Path("."), clock=clock).log
    for i in range(n):
        task_id = f"task-{seed}-{i}"
        reply = await reserve(nc, Decimal("0.02"), task_id=task_id)
        event = spend(
            task_id=task_id,
            usage=usage_costing_at_most(Decimal("0.02"), rng),
            at=clock(),
            reservation_id=reply.reservation_id,
            provider=rng.choice(["claude", "openai"]),
        )
        await log.append(event)
        spent.append(event)
        if i % 5 == 0:
            await log.append(
                FallbackTriggered(
                    id=uuid.uuid4().hex,
                    at=clock(),
                    task_id=task_id,
                    from_provider="gemini",
                    to_provider="claude",
                    reason="transient",
                    attempt=1,
                )
            )
        clock.advance(600)
    return spent


async def test_the_ledger_has_every_event_once_across_restarts_and_reports_the_sums(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock)
    keeper = BudgetKeeper(rt)
    async with running(keeper):
        async with running(CostLedger(rt)) as ledger:
            spent = await _paid_calls(conn, clock, 20, seed=1)
            await eventually(lambda: _caught_up(ledger))
        spent += await _paid_calls(conn, clock, 15, seed=2)  # while the ledger is down
        async with running(CostLedger(rt)) as ledger:
            assert 0 < ledger.replayed_events < len(await read_log(rt.log))
            spent += await _paid_calls(conn, clock, 5, seed=3)
            await eventually(lambda: _caught_up(ledger))
            report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
            # An empty body (what `nats req vapora.report ""` sends) asks the same (was a 400).
            assert (await ask(conn, subjects.REPORT, b"")).as_(CostReport) == report
            first = spent[0].at
            window = ReportRequest(since=first, until=first + timedelta(hours=1))
            windowed = (await ask(conn, subjects.REPORT, window)).as_(CostReport)
    entries = await read_log(rt.log)
    async with await Ledger.open(tmp_path / LEDGER_FILE) as db:
        logged = await db.logged_events()
    assert [e.seq for e in logged] == [e.seq for e in entries]  # each event once, none missing
    assert report.total_usd == total_spend(entries) == sum(e.cost_usd for e in spent)
    assert report.calls == 40 and report.last_sequence == entries[-1].seq
    by_provider = {p: Decimal(0) for p in ("claude", "openai")}
    for event in spent:
        by_provider[event.provider] += event.cost_usd
    assert report.by_provider == {p: v for p, v in sorted(by_provider.items()) if v}
    assert windowed.calls == 6  # one call every 10 minutes: [first, first + 1 h)
    assert windowed.total_usd == sum(e.cost_usd for e in spent[:6])


async def test_a_report_in_progress_holds_up_no_event_being_applied(
    conn: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A report over a large window reads for seconds; it read through the writer's connection
    # under the writer's lock, so the ledger applied nothing meanwhile.
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    reading, release = anyio.Event(), anyio.Event()
    sum_window = ledger_module._sum_window

    async def slow_sum_window(*args: Any) -> None:
        await sum_window(*args)
        reading.set()
        await release.wait()  # a report still reading its window

    monkeypatch.setattr(ledger_module, "_sum_window", slow_sum_window)
    await rt.log.ensure_stream()
    await rt.log.append(spend(task_id="t-1", usage=exact_usage(Decimal("0.03")), at=clock()))
    async with running(CostLedger(rt)) as ledger, anyio.create_task_group() as tg:
        answers: list[CostReport] = []

        async def report() -> None:
            answers.append((await ask(conn, subjects.REPORT, b"{}")).as_(CostReport))

        tg.start_soon(report)
        with anyio.fail_after(10):
            await reading.wait()
        await rt.log.append(spend(task_id="t-2", usage=exact_usage(Decimal("0.06")), at=clock()))
        await eventually(lambda: _caught_up(ledger))  # applied while the report reads
        release.set()
    [answer] = answers
    # The report is the state its read began in: the first spend, and its sequence.
    assert (answer.calls, answer.total_usd, answer.last_sequence) == (1, Decimal("0.03"), 1)


async def test_a_ledger_whose_last_record_is_a_message_that_is_no_event_starts_again(
    conn: Client, tmp_path: Path
) -> None:
    """A message in the stream that is not an event is passed by (recorded as a placeholder,
    ``unreadable-<seq>``); when it was the last thing recorded, the ledger's restart compared
    that placeholder with the stream's message id and refused to start, "built from another
    event stream", until its file was moved aside."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(), clock=clock)
    async with running(CostLedger(rt)) as ledger:
        await rt.log.append(spend(task_id="t1", usage=exact_usage(Decimal("0.3")), at=clock()))
        await rt.log.js.publish("vapora.events.spend.x", b"not json")  # no Nats-Msg-Id
        await rt.log.js.publish("vapora.events.spend.y", b"[]", headers={"Nats-Msg-Id": "m-2"})
        await eventually(lambda: _caught_up(ledger))
    async with running(CostLedger(rt)) as again:  # starts: the last event it recorded checks
        assert again.position == await rt.log.last_sequence()
    # Another stream of the same name is still told apart when the last row is a placeholder.
    await rt.log.js.delete_stream(rt.log.settings.name)
    await rt.log.ensure_stream()
    for n in range(4):
        await rt.log.append(
            spend(task_id=f"new{n}", usage=exact_usage(Decimal("0.03")), at=clock())
        )
    assert "was built from another event stream" in str(await _refusal_to_start(rt))


async def test_events_an_older_ledger_recorded_as_unreadable_are_recorded_when_they_read(
    conn: Client, tmp_path: Path
) -> None:
    """An older ledger passes by a newer writer's spend it cannot read (a field it does not
    know), recording a placeholder. Upgraded, the ledger never stored that spend, and when the
    placeholder was the last thing recorded it refused to start, "built from another event
    stream" (a review, upgrading from a day-old version). The placeholders that read now are
    recorded as the events they are. (The older ledger's file is made here by hand.)"""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(), clock=clock)
    async with running(CostLedger(rt)) as ledger:
        for n in range(3):
            await rt.log.append(
                spend(task_id=f"t{n}", usage=exact_usage(Decimal("0.3")), at=clock())
            )
        await eventually(lambda: _caught_up(ledger))
    with sqlite3.connect(tmp_path / LEDGER_FILE) as db:  # as the older ledger recorded them
        for seq in (2, 3):
            db.execute("DELETE FROM spend WHERE seq = ?", (seq,))
            db.execute(
                "UPDATE events SET event_id = ?, type = 'unreadable', task_id = NULL WHERE seq = ?",
                (f"unreadable-{seq}", seq),
            )
    async with running(CostLedger(rt)) as again:  # it starts
        report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
        assert again.position == 3
    assert (report.calls, report.total_usd) == (3, Decimal("0.9"))
    status, said = await audit_command(conn, rt.log, tmp_path)
    assert status == 0, said


async def test_a_ledger_whose_only_record_is_a_message_that_was_no_event_still_checks_its_stream(
    conn: Client, tmp_path: Path
) -> None:
    """With no event recorded to compare, the check was skipped: on a stream made again, the
    ledger resumed after the placeholder's sequence and passed by the new stream's first spend.
    The stream must not hold an event where the ledger recorded a message that was none."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(), clock=clock)
    async with running(CostLedger(rt)) as ledger:
        await rt.log.js.publish("vapora.events.spend.x", b"not json")  # seq 1: no event
        await eventually(lambda: _caught_up(ledger))
    async with running(CostLedger(rt)):  # the same stream: it starts
        pass
    await rt.log.js.delete_stream(rt.log.settings.name)
    await rt.log.ensure_stream()
    await rt.log.append(spend(task_id="new0", usage=exact_usage(Decimal("0.3")), at=clock()))
    assert "a message that was no event at sequence 1" in str(await _refusal_to_start(rt))


async def test_a_ledger_of_another_stream_of_the_same_name_refuses_to_start(
    conn: Client, tmp_path: Path
) -> None:
    """The stream made again (or the data directory pointed at another server): the ledger
    resumed after its last sequence unchecked, so the new stream's first events were never
    recorded (or its later ones recorded on top of the old stream's)."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(), clock=clock)
    async with running(CostLedger(rt)) as ledger:
        for n in range(5):
            await rt.log.append(
                spend(task_id=f"old{n}", usage=exact_usage(Decimal("0.3")), at=clock())
            )
        await eventually(lambda: _caught_up(ledger))
    async with running(CostLedger(rt)):  # the same stream: it starts
        pass
    await rt.log.js.delete_stream(rt.log.settings.name)
    await rt.log.ensure_stream()
    for n in range(8):  # longer than before: a check on the length alone would not see it
        await rt.log.append(
            spend(task_id=f"new{n}", usage=exact_usage(Decimal("0.03")), at=clock())
        )
    error = await _refusal_to_start(rt)
    assert "was built from another event stream" in str(error)
    assert "Move the file aside" in str(error)
    (tmp_path / LEDGER_FILE).rename(tmp_path / "old-ledger.sqlite3")
    async with running(CostLedger(rt)) as again:  # rebuilt from the new stream
        await eventually(lambda: _caught_up(again))
        report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
    assert report.calls == 8 and report.total_usd == Decimal("0.24")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b'{"since": "yesterday"}', "$.since"),
        (b'{"since": "2026-06-02T00:00:00Z", "until": "2026-06-01T00:00:00Z"}', "`since`"),
        (b'{"from": "2026-06-01T00:00:00Z"}', "unknown field `from`"),
        (b"not json", "malformed JSON"),
    ],
)
async def test_malformed_report_requests_get_400_and_change_nothing(
    conn: Client, tmp_path: Path, body: bytes, named: str
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    await rt.log.append(spend(task_id="t", usage=exact_usage(Decimal("0.03")), at=clock()))
    async with running(CostLedger(rt)) as ledger:
        answer = await ask(conn, subjects.REPORT, body)
        assert answer.status == "400" and named in answer.error().error.message
        report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
        assert (report.total_usd, report.calls, ledger.position) == (Decimal("0.03"), 1, 1)


# --- the commands --------------------------------------------------------------------------------


async def test_audit_passes_on_a_clean_run_and_names_an_altered_row_and_a_mispriced_event(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock)
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)) as ledger:
        await _paid_calls(conn, clock, 12)
        await eventually(lambda: _caught_up(ledger))
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 0, text
        assert "no differences" in text and "skipped" not in text

        altered = [e for e in await read_log(rt.log) if isinstance(e.event, SpendRecorded)][3]
        assert isinstance(altered.event, SpendRecorded)
        with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
            db.execute("UPDATE spend SET cost_usd = '0.5' WHERE seq = ?", (altered.seq,))
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 1
        assert f"ledger row seq {altered.seq}: cost_usd" in text
        with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
            db.execute(
                "UPDATE spend SET cost_usd = ? WHERE seq = ?",
                (str(altered.event.cost_usd), altered.seq),
            )
        assert (await audit_command(conn, rt.log, tmp_path))[0] == 0

        wrong = spend(
            task_id="mispriced",
            usage=exact_usage(Decimal("0.03")),
            at=clock(),
            cost_usd=Decimal("0.01"),  # usage x prices says $0.03
        )
        seq = (await rt.log.append(wrong)).seq
        await eventually(lambda: _caught_up(ledger))
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 1
        assert f"spend_recorded seq {seq} (task mispriced" in text and wrong.id in text
        assert "$0.03" in text and "$0.01" in text


async def test_a_stored_message_that_is_no_event_stops_no_one_and_the_audit_names_it(
    conn: Client, tmp_path: Path
) -> None:
    """A message no reader can decode, stored among the events (by a writer outside vapora): the
    keeper and the ledger stopped at it for good, counted no spend after it and could not start
    again. They skip it now, and the audit reports it."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock)
    await rt.log.ensure_stream()
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)) as ledger:
        before = await _paid_calls(conn, clock, 2)
        await conn.publish(f"{rt.log.settings.prefix}.spend.x", b'{"type": "chunk", "seq": 0}')
        await conn.flush()
        after = await _paid_calls(conn, clock, 2, seed=2)
        await eventually(lambda: _caught_up(ledger))
        report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
        assert report.total_usd == sum(s.cost_usd for s in before + after)

        async def keeper_counted_it_all() -> bool:
            return (await status(conn)).spent_today_usd == report.total_usd

        await eventually(keeper_counted_it_all)
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 1
        assert "event log at sequence" in text and "'chunk'" in text
    # A restart replays past it too.
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)):
        await eventually(keeper_counted_it_all)


async def test_audit_names_what_the_ledger_holds_past_the_logs_end(
    conn: Client, tmp_path: Path
) -> None:
    """The log lost its last writes (an OS crash within ``sync_interval``, a restored backup)
    while the ledger had committed them: the audit compared the ledger only up to the log's
    last sequence and passed, while every report counted the spend the log no longer has."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    spent = [
        spend(task_id=f"t{n}", usage=exact_usage(Decimal(cost)), at=clock())
        for n, cost in enumerate(("0.03", "0.06", "0.09"))
    ]
    for event in spent:
        await rt.log.append(event)
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _caught_up(ledger))
    assert (await audit_command(conn, rt.log, tmp_path))[0] == 0
    # The same log without its last event: its first two at the same sequences.
    await rt.log.js.delete_stream(rt.log.settings.name)
    await rt.log.ensure_stream()
    for event in spent[:2]:
        await rt.log.append(event)
    code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 1, text
    [line] = [line for line in text.splitlines() if "ledger at sequence 3" in line]
    assert "nothing past the log's last sequence 2" in line
    assert "spend_recorded of $0.09" in line and spent[2].id in line


@pytest.mark.parametrize("where", [0, -5, "past the end"])
async def test_audit_names_a_spend_row_added_where_no_event_is(
    conn: Client, tmp_path: Path, where: int | str
) -> None:
    """A spend row written into the ledger's file by hand, at a sequence no event has (0 or
    below, or past the log's end with the ledger's position left as it was): every report
    counted it, and the audit, reading rows only within the log's sequences and past the
    ledger's own position, said "no differences" (a review)."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    for n, cost in enumerate(("0.03", "0.06")):
        await rt.log.append(spend(task_id=f"t{n}", usage=exact_usage(Decimal(cost)), at=clock()))
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _caught_up(ledger))
    assert (await audit_command(conn, rt.log, tmp_path))[0] == 0
    seq = 3 if where == "past the end" else where
    with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(spend)")]
        copied = ", ".join(
            "? AS seq" if c == "seq" else "'forged' AS event_id" if c == "event_id" else c
            for c in columns
        )
        db.execute(f"INSERT INTO spend SELECT {copied} FROM spend WHERE seq = 1", (seq,))
    code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 1, text
    assert "forged" in text and "$0.03" in text, text


async def test_the_audit_reads_the_log_and_the_ledger_a_chunk_at_a_time(
    conn: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of three events: the chunks' edges fall between a spend and its neighbours, and
    the audit still passes on a clean run and names an altered row in a later chunk."""
    monkeypatch.setattr(commands_money, "_CHUNK", 3)
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=10_000), clock=clock)
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)) as ledger:
        await _paid_calls(conn, clock, 9)
        await eventually(lambda: _caught_up(ledger))
        code, text = await audit_command(conn, rt.log, tmp_path)
        assert code == 0, text
        last = [e for e in await read_log(rt.log) if isinstance(e.event, SpendRecorded)][-1]
        with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
            db.execute("UPDATE spend SET provider = 'x' WHERE seq = ?", (last.seq,))
        code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 1
    assert f"ledger row seq {last.seq}: provider" in text


async def test_audit_without_a_keeper_says_so_and_still_checks_the_ledger(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    for cost in ("0.03", "0.06"):
        await rt.log.append(spend(task_id="t", usage=exact_usage(Decimal(cost)), at=clock()))
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _caught_up(ledger))
    code, text = await audit_command(conn, rt.log, tmp_path)
    assert code == 0 and "no budget keeper is running" in text
    # A directory without a ledger is most often the wrong one: said so, exit 2, not every
    # spend of the log listed as missing from a ledger.
    code, text = await audit_command(conn, rt.log, tmp_path / "empty")
    assert code == 2 and "no ledger database at" in text and "--data-dir" in text
    assert "no row" not in text and "2 events" in text


async def test_report_and_budget_commands_print_tables_or_json(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, cfg=config(daily_cents=100, monthly_cents=1000), clock=clock)
    with pytest.raises(NoProviderAvailable, match="budget keeper is not running"):
        await budget_command(conn, as_json=False)
    async with running(BudgetKeeper(rt)), running(CostLedger(rt)) as ledger:
        await _paid_calls(conn, clock, 3)
        held = await reserve(conn, Decimal("0.25"))
        await eventually(lambda: _caught_up(ledger))
        table = await budget_command(conn, as_json=False)
        data = json.loads(await budget_command(conn, as_json=True))
        report_table = await report_command(conn, since=None, until=None, as_json=False)
        report = json.loads(await report_command(conn, since=None, until=None, as_json=True))
    assert held.admitted
    assert "today (UTC)" in table and "$1.00" in table and "open reservations   1" in table
    assert data["reserved_usd"] == "0.25" and data["tier"] in table
    # A tier that stays Exceeded at 85.4 % (its way back down) read as a contradiction.
    assert "back down 5 points below either" in table
    assert "Total" in report_table and "By provider" in report_table
    assert report["calls"] == 3 and Decimal(report["total_usd"]) > 0


async def test_events_prints_json_lines_filtered_by_type_and_task_and_follows(
    conn: Client, tmp_path: Path
) -> None:
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    async with running(BudgetKeeper(rt)):
        spent = await _paid_calls(conn, clock, 6)
    out = io.StringIO()
    assert await events_command(rt.log, follow=False, type_=None, task_id=None, out=out) == len(
        await read_log(rt.log)
    )
    out = io.StringIO()
    await events_command(rt.log, follow=False, type_="spend_recorded", task_id=None, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["id"] for line in lines] == [e.id for e in spent]
    out = io.StringIO()
    task = spent[2].task_id
    await events_command(rt.log, follow=False, type_=None, task_id=task, out=out)
    kinds = [json.loads(line)["type"] for line in out.getvalue().splitlines()]
    assert kinds == ["budget_reserved", "spend_recorded"]
    with pytest.raises(InvalidRequest, match="unknown event type 'spent'"):
        await events_command(rt.log, follow=False, type_="spent", task_id=None, out=out)

    followed = io.StringIO()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: events_command(
                rt.log, follow=True, type_="spend_recorded", task_id="late", out=followed
            )
        )
        late = spend(task_id="late", usage=exact_usage(Decimal("0.03")), at=clock())
        await rt.log.append(late)
        await eventually(lambda: _has(followed, late.id))
        tg.cancel_scope.cancel()
    assert commands_money.LEDGER_FILE == LEDGER_FILE


async def test_the_events_behind_a_reports_figure_are_printed_by_provider_and_time(
    conn: Client, tmp_path: Path
) -> None:
    """A cost shown can be traced to the events that made it: `vapora events` took only a type
    and a task id, so finding the spends behind one provider's hour of a report meant reading
    the whole log (a review). With --provider, --since and --until (the report's window),
    the spends printed sum to the report's figure for that window, to the last decimal."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    spent = []
    for n, (provider, cost) in enumerate(
        [("claude", "0.03"), ("openai", "0.06"), ("claude", "0.09")] * 2
    ):
        event = spend(
            task_id=f"t{n}", usage=exact_usage(Decimal(cost)), at=clock(), provider=provider
        )
        await rt.log.append(event)
        spent.append(event)
        clock.advance(1800)  # two spends an hour
    since, until = spent[2].at, spent[2].at + timedelta(hours=1)  # spends 2 and 3 (claude's)
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _caught_up(ledger))
        window = ReportRequest(since=since, until=until)
        report = (await ask(conn, subjects.REPORT, window)).as_(CostReport)
    out = io.StringIO()
    printed = await events_command(
        rt.log, follow=False, type_="spend_recorded", task_id=None, provider="claude",
        since=since, until=until, out=out,
    )  # fmt: skip
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert printed == 2 and [line["id"] for line in lines] == [spent[2].id, spent[3].id]
    assert sum(Decimal(line["cost_usd"]) for line in lines) == report.by_provider["claude"]
    # The window is the report's: its end excluded.
    out = io.StringIO()
    await events_command(
        rt.log, follow=False, type_=None, task_id=None, since=spent[5].at, until=spent[5].at,
        out=out,
    )  # fmt: skip
    assert out.getvalue() == ""


async def test_the_events_behind_each_report_row_are_listed_once_each(
    conn: Client, tmp_path: Path
) -> None:
    """A review: a spend stored twice (appended again after the log's duplicate window) was
    listed twice, so the events behind a figure summed past it; the report's model and task
    type rows could not be listed (no such filters); an event time without an offset stopped
    `--since` with a TypeError (every other reader takes it as UTC)."""
    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    spent = [
        spend(task_id=f"t{n}", usage=exact_usage(Decimal(cost)), at=clock(), provider=provider)
        for n, (provider, cost) in enumerate([("claude", "0.03"), ("openai", "0.06")])
    ]
    for event in spent:
        await rt.log.append(event)
    subject = subjects.event_subject("spend_recorded", "claude", rt.log.settings.prefix)
    await rt.log.js.publish(subject, encode(spent[0]))  # stored again, no message id
    naive = msgspec.json.decode(
        encode(spend(task_id="t-naive", usage=exact_usage(Decimal("0.03")), at=clock()))
    )
    naive["at"] = clock().replace(tzinfo=None).isoformat()  # no offset
    naive["model"] = "other-model"
    await rt.log.js.publish(subject, msgspec.json.encode(naive))
    async with running(CostLedger(rt)) as ledger:
        await eventually(lambda: _caught_up(ledger))
        report = (await ask(conn, subjects.REPORT, ReportRequest())).as_(CostReport)

    async def listed(**filters: Any) -> list[dict[str, Any]]:
        out, err = io.StringIO(), io.StringIO()
        await events_command(
            rt.log, follow=False, type_="spend_recorded", task_id=None, out=out, err=err,
            since=clock() - timedelta(hours=1), **filters,
        )  # fmt: skip
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def total(lines: list[dict[str, Any]]) -> Decimal:
        return sum((Decimal(line["cost_usd"]) for line in lines), Decimal(0))

    assert total(await listed()) == report.total_usd == Decimal("0.12")
    assert total(await listed(provider="claude")) == report.by_provider["claude"]
    assert total(await listed(model="claude-test")) == report.by_model["claude-test"]
    assert [line["task_id"] for line in await listed(model="other-model")] == ["t-naive"]
    by_type = await listed(task_type="CodeGeneration")
    assert total(by_type) == report.by_task_type["CodeGeneration"]
    assert await listed(task_type="Documentation") == []
    err = io.StringIO()
    await events_command(rt.log, follow=False, type_=None, task_id=None, out=io.StringIO(), err=err)
    assert "1 events stored again under an id already listed" in err.getvalue()


async def _has(out: io.StringIO, text: str) -> bool:
    return text in out.getvalue()


async def test_the_ledger_starts_again_after_an_event_stored_without_its_message_id(
    conn: Client, tmp_path: Path
) -> None:
    """An event a writer outside vapora stored without ``Nats-Msg-Id``: the ledger applied it,
    then refused every start, taking the log for another stream (its check read the id from
    the header alone, a review). The id in the body is the event's."""
    from events.codec import encode

    clock = FakeClock()
    rt = runtime(conn, tmp_path, clock=clock)
    await rt.log.ensure_stream()
    outside = spend(task_id="outside", usage=exact_usage(Decimal("0.03")), at=clock())
    async with running(CostLedger(rt)) as ledger:
        await rt.log.js.publish(f"{rt.log.settings.prefix}.spend.claude", encode(outside))
        await eventually(lambda: _caught_up(ledger))
    async with running(CostLedger(rt)) as again:  # (refused: ConfigError, "another stream")
        report = (await ask(conn, subjects.REPORT, b"{}")).as_(CostReport)
        assert again is not None and report.total_usd == outside.cost_usd
