"""The `vapora` commands' argument types: what they take and how they refuse."""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vapora.cli import _timestamp


@pytest.mark.parametrize(
    "text", ["2026-11-27T05:00Z", "2026-11-27t05:00z", "2026-11-27T10:30+05:30", "2026-11-27T05:00"]
)
def test_a_timestamp_is_any_iso_8601_or_rfc_3339_spelling_of_it(text: str) -> None:
    """RFC 3339 allows a lower-case `t` and `z`: the report's request took them, the command
    said "not an ISO 8601 timestamp" (a review)."""
    assert _timestamp(text) == datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


def test_a_timestamp_that_is_none_is_refused_naming_it() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO 8601 timestamp: 'noon'"):
        _timestamp("noon")


def test_a_report_window_starting_in_the_future_is_said(tmp_path: Path) -> None:
    """A mistyped year (`--since 2062-...`) printed an empty report, read as no spend. (Its own
    process: the suite's event loop runs in this thread.)"""
    future = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%d")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vapora.cli",
            "report",
            "--since",
            future,
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"--since {future}T00:00:00+00:00 is in the future" in done.stderr
    assert done.returncode == 2 and "no ledger at" in done.stderr  # (an empty directory)
