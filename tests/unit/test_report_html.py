"""The HTML report: self-contained, its figures are sums of the events, it escapes what it shows."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser

import msgspec

from events import BudgetTierChanged, RouteDecided, SpendRecorded, Tier
from tests.samples import AT, EVENTS
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
