"""The ``[budget]`` lease setting: on by default, off with 0, a bad value named by its key."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from vapora.config import parse_config
from vapora.errors import ConfigError

GUIDE = (Path(__file__).parent.parent / "fixtures" / "llm-router.toml").read_text()
AT = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def parse(lease_line: str = "") -> Decimal:
    text = GUIDE.replace("[budget]\n", f"[budget]\n{lease_line}\n", 1)
    return parse_config(text, source="test.toml", at=AT).budget.lease_usd


def test_leases_are_on_by_default_at_one_dollar_and_the_key_sets_their_size() -> None:
    assert parse() == Decimal(1)
    assert parse("lease_cents = 250") == Decimal("2.5")
    assert parse("lease_cents = 0") == 0  # off: every paid attempt reserves with the keeper


@pytest.mark.parametrize("value", ["-1", "nan", "inf", '"lots"'])
def test_a_bad_lease_size_is_rejected_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"test\.toml: .*budget\.lease_cents"):
        parse(f"lease_cents = {value}")
