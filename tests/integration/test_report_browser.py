"""The HTML report opens in a real headless browser (Debian's chromium) and draws its charts."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from PIL import Image

from events import BudgetTierChanged, SpendRecorded, Tier
from tests.samples import AT, EVENTS
from vapora.report_html import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLAUDE_ORANGE = (0xD9, 0x77, 0x06)
EXCEEDED_RED = (0xFE, 0xCA, 0xCA)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def screenshot(page: Path, out: Path, profile: Path) -> Image.Image:
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1000,900",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Image.open(out).convert("RGB")


def test_the_report_renders_its_spend_chart_and_tier_band(tmp_path: Path) -> None:
    base = EVENTS["spend_recorded"]
    assert isinstance(base, SpendRecorded)
    spends = [
        msgspec.structs.replace(base, id=f"s{i}", at=AT + timedelta(seconds=i), cost_usd=Decimal(i))
        for i in range(1, 20)
    ]
    change = EVENTS["budget_tier_changed"]
    assert isinstance(change, BudgetTierChanged)
    exceeded = msgspec.structs.replace(change, at=AT + timedelta(seconds=10), to_tier=Tier.EXCEEDED)
    page = tmp_path / "report.html"
    page.write_text(render_html([*spends, exceeded], now=AT))
    image = screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    colours = (
        set(image.get_flattened_data())
        if hasattr(image, "get_flattened_data")
        else set(image.getdata())
    )
    assert CLAUDE_ORANGE in colours, "the spend line was not drawn"
    assert EXCEEDED_RED in colours, "the tier band was not drawn"
