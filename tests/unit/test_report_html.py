"""The HTML report: self-contained, its figures are sums of the events, it escapes what it shows."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser

import msgspec

from events import BudgetTierChanged, RouteDecided, SpendRecorded, Tier
from tests.samples import AT, EVENTS
from vapora.audit import usd
from vapora.report_html import render_html


def spend(n: int, provider: str, cost: str) -> SpendRecorded:
    base = EVENTS["spend_recorded"]
    assert isinstance(base, SpendRecorded)
    return msgspec.structs.replace(
        base,
        id=f"s{n}",
        at=AT + timedelta(seconds=n),
        provider=provider,
        cost_usd=Decimal(cost),
        task_id=f"t{n}",
    )


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def test_the_page_draws_one_line_per_provider_and_states_the_exact_total() -> None:
    events = [
        spend(1, "claude", "0.0125"),
        spend(2, "openai", "0.3"),
        spend(3, "claude", "0.0000001"),
    ]
    page = render_html(events, now=AT)
    parser = Tags()
    parser.feed(page)
    assert parser.tags.count("polyline") == 2
    assert "total <b>$0.3125001</b>" in page
    assert "claude $0.0125001" in page


def test_the_page_needs_nothing_from_outside() -> None:
    page = render_html(list(EVENTS.values()), now=AT)
    assert not re.search(r"<script|src=|href=\"http", page)


def test_tier_bands_and_the_cause_of_each_change_are_shown() -> None:
    change = EVENTS["budget_tier_changed"]
    assert isinstance(change, BudgetTierChanged)
    page = render_html([spend(1, "claude", "1"), change], now=AT)
    assert "Normal → NearThreshold" in page and change.causation_id in page
    assert page.count("<rect") >= 2


def test_decisions_are_listed_and_escaped() -> None:
    decided = EVENTS["route_decided"]
    assert isinstance(decided, RouteDecided)
    sneaky = msgspec.structs.replace(
        decided,
        decision=msgspec.structs.replace(
            decided.decision, reason="<script>alert(1)</script>", tier=Tier.EXCEEDED
        ),
    )
    page = render_html([sneaky], now=AT)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "CodeGeneration" in page and "Exceeded" in page


def test_an_empty_log_still_renders() -> None:
    page = render_html([], now=AT)
    assert "No spend recorded" in page and "No routing decisions" in page


def test_an_event_stored_twice_is_counted_once_as_the_ledger_counts_it() -> None:
    first, second = spend(1, "claude", "0.0045"), spend(2, "openai", "0.0045")
    page = render_html([first, second, first], now=AT)  # `first` appended again, days later
    assert "2 calls billed, total <b>$0.009</b>" in page
    assert "claude $0.0045" in page


def test_the_window_is_since_inclusive_until_exclusive_as_in_the_text_report() -> None:
    events = [spend(n, "claude", "0.01") for n in range(5)]  # at AT + 0 s .. AT + 4 s
    since, until = AT + timedelta(seconds=1), AT + timedelta(seconds=4)
    page = render_html(events, now=AT, since=since, until=until)
    assert "3 calls billed, total <b>$0.03</b>" in page
    assert f"{since:%Y-%m-%d %H:%M:%S} UTC .. {until:%Y-%m-%d %H:%M:%S} UTC" in page
    assert "4 calls billed" in render_html(events, now=AT, since=since)
    assert "1 calls billed" in render_html(events, now=AT, until=since)


def test_the_tier_in_force_when_the_window_opens_is_the_one_drawn_first() -> None:
    change = EVENTS["budget_tier_changed"]
    assert isinstance(change, BudgetTierChanged)
    exceeded = msgspec.structs.replace(
        change, at=AT - timedelta(hours=1), from_tier=Tier.NORMAL, to_tier=Tier.EXCEEDED
    )
    page = render_html([exceeded, spend(1, "claude", "1")], now=AT, since=AT)
    assert "<title>Exceeded</title></rect>" in page
    assert "<title>Normal</title></rect>" not in page
    assert "The tier never changed" in page  # within the window


def test_tiny_amounts_are_plain_decimals_with_every_digit() -> None:
    page = render_html([spend(1, "gemini", "0.000000075"), spend(2, "gemini", "0E-7")], now=AT)
    assert "total <b>$0.000000075</b>" in page and "gemini $0.000000075" in page
    assert not re.search(r"\dE-\d", page)


def test_an_event_whose_time_has_no_zone_is_drawn_as_utc_with_the_others() -> None:
    """The contract reads a time without a zone as UTC, and the text report, the audit and the
    ledger do; the page compared it with the others' aware times and failed (TypeError)."""
    naive = msgspec.structs.replace(spend(2, "openai", "0.3"), at=AT.replace(tzinfo=None))
    change = EVENTS["budget_tier_changed"]
    assert isinstance(change, BudgetTierChanged)
    naive_change = msgspec.structs.replace(
        change, at=(AT + timedelta(seconds=5)).replace(tzinfo=None)
    )
    events = [spend(1, "claude", "0.0125"), naive, spend(3, "claude", "0.5"), naive_change]
    page = render_html(events, now=AT, since=AT)
    assert "total <b>$0.8125</b>" in page
    assert page.count("<polyline") == 2


def test_a_long_log_draws_a_bounded_curve_with_the_exact_total_and_the_last_decisions() -> None:
    """The page held every event of the log and drew one point per spend (a million spends: a
    page of tens of MB). Built batch by batch, it keeps a bounded curve per provider (neighbours
    merged: the same total) and the last 500 decisions, and its sums stay exact."""
    from vapora.report_html import Page

    decision = EVENTS["route_decided"]
    assert isinstance(decision, RouteDecided)
    page = Page()
    spends = [spend(n, "claude" if n % 3 else "gemini", "0.0000013") for n in range(5000)]
    for start in range(0, 5000, 700):  # in batches, as the log is read
        page.add(spends[start : start + 700])
    page.add(msgspec.structs.replace(decision, id=f"d{n}", task_id=f"task-{n}") for n in range(600))
    html = page.render(now=AT)
    curves = re.findall(r'points="([^"]*)"', html)
    assert len(curves) == 2 and all(len(c.split()) <= 2001 for c in curves)
    assert "5000 calls billed" in html and "total <b>$0.0065</b>" in html
    claude = sum(Decimal("0.0000013") for n in range(5000) if n % 3)
    assert f"claude {usd(claude)}" in html
    assert "The last 500 of 600." in html and "task-599" in html and "task-99<" not in html


def test_a_listed_decision_keeps_its_fallbacks_however_many_tasks_come_after() -> None:
    """Fallbacks were kept for the 10,000 tasks heard of last only: a listed decision lost its
    own when enough other tasks fell back after it. And past 2,000 spends (points merged) the
    curve's axis began at the second spend."""
    from datetime import timedelta

    from events import CallSucceeded, FallbackTriggered
    from vapora.report_html import Page

    decision = EVENTS["route_decided"]
    fallback = EVENTS["fallback_triggered"]
    served = EVENTS["call_succeeded"]
    assert isinstance(decision, RouteDecided)
    assert isinstance(fallback, FallbackTriggered) and isinstance(served, CallSucceeded)
    page = Page()
    page.add([msgspec.structs.replace(decision, id="d-long", task_id="long-task")])
    page.add([msgspec.structs.replace(fallback, id="f-long", task_id="long-task")])
    page.add(
        msgspec.structs.replace(fallback, id=f"f{n}", task_id=f"other-{n}") for n in range(12_000)
    )
    page.add([msgspec.structs.replace(served, id="s-long", task_id="long-task")])
    spends = [
        msgspec.structs.replace(spend(n, "claude", "0.001"), at=AT + timedelta(minutes=n))
        for n in range(2001)
    ]
    page.add(spends)
    html = page.render(now=AT)
    [row] = [r for r in html.split("<tr>") if "long-task" in r]
    assert f"{fallback.from_provider} → {fallback.to_provider}" in row
    assert f"<td>{served.provider}</td>" in row
    assert f">{AT:%H:%M:%S}</text>" in html  # the axis begins at the first spend


def test_the_page_total_is_exact_for_amounts_of_many_digits() -> None:
    """The page said "exact sum" and added at Python's default 28 digits: $1.5 and $1E-40 made
    $1.50."""
    page = render_html([spend(1, "claude", "1.5"), spend(2, "claude", "1E-40")], now=AT)
    exact = "$1.5" + "0" * 38 + "1"  # 1.5 + 1E-40, every digit
    assert f"total <b>{exact}</b>" in page and f"claude {exact}" in page
