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


def test_limits_in_cents_are_their_exact_amounts_in_usd() -> None:
    from actors.budget_keeper import limits_of

    digits = "99." + "9" * 30  # 32 digits: at 28 a limit of $1.000000000000000000000000000
    lines = [line for line in GUIDE.splitlines() if "_limit_cents" not in line]
    text = "\n".join(lines).replace(
        "[budget]",
        f'[budget]\ndaily_limit_cents = "{digits}"\nper_task_limit_cents = "{digits}"',
        1,
    )
    config = parse_config(text, source="test.toml", at=AT).budget
    exact = Decimal("0." + "9" * 32)
    assert config.daily_limit_usd == config.per_task_limit_usd == exact
    assert limits_of(config).daily_usd == limits_of(config).per_task_usd == exact
