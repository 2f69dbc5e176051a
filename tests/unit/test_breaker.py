"""The provider actor's circuit breaker as a state machine on a fake clock."""

from __future__ import annotations

from actors.provider import CircuitBreaker


def test_a_late_success_does_not_close_an_open_breaker_only_the_probe_does() -> None:
    now = [0.0]
    breaker = CircuitBreaker(3, 2.5, clock=lambda: now[0])
    for _ in range(3):
        assert breaker.admit()
        breaker.failure()
    assert breaker.poll() == "open"
    # A call admitted before the breaker opened comes back fine: still open.
    breaker.success()
    assert breaker.poll() == "open" and not breaker.admit()
    now[0] = 2.6
    assert breaker.admit(), "the probe"
    assert not breaker.admit(), "only one probe at a time"
    breaker.success()
    assert breaker.poll() == "closed" and breaker.admit()
