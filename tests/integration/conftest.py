"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.telemetry_harness import Recorded, recording


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    """Telemetry on, spans and metrics recorded in memory (a module may define its own)."""
    yield from recording(Recorded)
