"""A call's ``Vapora-Deadline`` (when its router stops waiting, Unix ms by the router's clock):
a call read more than the clocks' tolerance past it is refused, not made; a header that is not
one is not taken (the call is served as any other)."""

from __future__ import annotations

import re
import time

import pytest

from actors.provider import _CLOCK_TOLERANCE_S, _past_deadline


def _ms(offset_s: float) -> str:
    return f"{(time.time() + offset_s) * 1000:.0f}"


@pytest.mark.parametrize(
    "header", [None, "", "abc", "-5", "1e12", " 1", "1" * 16, "\uff11\uff12\uff13"]
)
def test_a_header_that_is_not_a_deadline_lets_the_call_through(header: str | None) -> None:
    assert _past_deadline(header, "openai") is None


@pytest.mark.parametrize("offset_s", [3600.0, 5.0, 0.0])
def test_a_deadline_not_passed_lets_the_call_through(offset_s: float) -> None:
    assert _past_deadline(_ms(offset_s), "openai") is None  # (made when the test runs)


def test_a_deadline_within_the_clocks_tolerance_lets_the_call_through() -> None:
    assert _past_deadline(_ms(-_CLOCK_TOLERANCE_S / 2), "openai") is None


@pytest.mark.parametrize("late_s", [_CLOCK_TOLERANCE_S + 0.5, 30.0, 3600.0])
def test_a_call_read_past_its_deadline_is_refused_saying_how_late(late_s: float) -> None:
    refusal = _past_deadline(_ms(-late_s), "openai")
    assert refusal is not None
    assert refusal.error_type == "expired_in_queue" and refusal.error_class == "transient"
    said = re.search(r"read ([0-9.]+) s after its router stopped waiting", str(refusal))
    assert said and abs(float(said[1]) - late_s) < 0.5 and "not called" in str(refusal)
