"""Provider actors under load and faults: two OS processes share one provider's calls and the
router rides out a SIGKILL of one; a 429's ``retry-after`` closes a provider until then; the
circuit breaker opens and closes. Real nats-server, simulator over HTTP, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from actors.provider import CircuitBreaker, RateLimiter
from events.contract import CompletionResult, Outcome
from events.log import ProviderHealthChanged
from tests.fault.provider_harness import KEYS, config_text, deployment, until
from vapora.errors import VaporaError

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def guide(**kw: object) -> Callable[[str], str]:
    return lambda base_url: config_text(base_url, **kw)  # type: ignore[arg-type]


async def _srv_replies(nc: object, subject: str, *, expect: int) -> list[dict[str, object]]:
    """Every instance's answer to a ``$SRV`` discovery request (they all answer one inbox)."""
    inbox = nc.new_inbox()  # type: ignore[attr-defined]
    sub = await nc.subscribe(inbox)  # type: ignore[attr-defined]
    await nc.publish(subject, b"", reply=inbox)  # type: ignore[attr-defined]
    replies = []
    with anyio.move_on_after(2):
        while len(replies) < expect:
            replies.append(json.loads((await sub.next_msg(timeout=2)).data))
    await sub.unsubscribe()
    return replies


def _start_provider_process(url: str, config_file: Path, provider: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **KEYS, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fault.provider_process", url, str(config_file), provider],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def test_two_processes_share_a_provider_and_a_sigkill_loses_no_request(
    tmp_path: Path,
) -> None:
    models = {"gemini": "gemini-2.0-flash-slow-15"}
    text_for = guide(models=models, timeouts={"gemini": 5000})
    options = {"grace_s": 0.5}
    async with deployment(tmp_path, text_for, providers=[], router_options=options) as dep:
        config_file = tmp_path / "vapora.toml"
        config_file.write_text(text_for(dep.sim.base_url))
        workers = [_start_provider_process(dep.server.url, config_file, "gemini") for _ in range(2)]
        try:
            with anyio.fail_after(30):
                for worker in workers:
                    assert worker.stdout is not None
                    line = await anyio.to_thread.run_sync(worker.stdout.readline)
                    assert line.strip() == b"ready"
            results: list[CompletionResult] = []
            errors: list[VaporaError] = []
            limiter = anyio.Semaphore(48)

            async def one(i: int) -> None:
                async with limiter:
                    try:
                        results.append(
                            await dep.client.complete(prompt=f"question {i}", provider="gemini")
                        )
                    except VaporaError as error:
                        errors.append(error)

            async def kill_mid_load() -> None:
                await until(lambda: len(results) >= 300, within_s=30)
                stats = await _srv_replies(dep.client.nc, "$SRV.STATS.provider-gemini", expect=2)
                served = [s["endpoints"][0]["num_requests"] for s in stats]  # type: ignore[index]
                assert len(served) == 2 and all(n > 0 for n in served), served
                workers[0].send_signal(signal.SIGKILL)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_mid_load)
                    for i in range(1000):
                        tg.start_soon(one, i)
            # Every request got an answer: none was lost with the killed process.
            assert not errors, errors[:3]
            assert len(results) == 1000
            assert len({r.task_id for r in results}) == 1000
            retried = [r for r in results if len(r.attempts) > 1]
            assert retried, "some calls were in flight in the killed process"
            for result in retried:
                assert result.attempts[0].error_code == "no_reply"
                assert result.attempts[-1].outcome is Outcome.OK
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                await anyio.to_thread.run_sync(worker.wait)


async def test_a_429_closes_the_provider_until_retry_after_and_the_router_routes_around(
    tmp_path: Path,
) -> None:
    async with deployment(tmp_path, guide()) as dep:
        dep.sim.control(
            {"provider": "anthropic", "fail_next": 1, "fail_with": "error-429-retryms-1500"}
        )
        ask = {"prompt": "write code", "task_type": "CodeGeneration", "quality": "High"}
        first = await dep.client.complete(**ask)
        assert first.attempts[0].provider == "claude"
        assert first.attempts[0].error_code == "rate_limited"
        assert first.provider != "claude"
        assert dep.router is not None
        router = dep.router
        await until(lambda: router.views["claude"].rate_limited_until is not None)
        calls_to_claude = dep.sim.stats()["providers"]["anthropic"]["requests"]
        second = await dep.client.complete(**ask)
        assert second.provider != "claude"
        assert [a.provider for a in second.attempts] == [second.provider]
        [claude] = [c for c in second.route.candidates if c.provider == "claude"]
        assert any("rate limited until" in v.reason for v in claude.verdicts)
        assert dep.sim.stats()["providers"]["anthropic"]["requests"] == calls_to_claude
        events = [e for e in await dep.events() if isinstance(e, ProviderHealthChanged)]
        limited = [e for e in events if e.provider == "claude" and e.rate_limited_until]
        assert limited and not limited[0].available
        # After the wait the provider says (retry-after, rounded up to whole seconds by the
        # provider's header), claude is chosen again.
        until_then = router.views["claude"].rate_limited_until
        assert until_then is not None
        assert until_then <= datetime.now(UTC) + timedelta(seconds=3)
        await anyio.sleep((until_then - datetime.now(UTC)).total_seconds() + 0.05)
        third = await dep.client.complete(**ask)
        assert third.provider == "claude"


async def test_the_breaker_opens_after_consecutive_failures_and_closes_after_a_probe(
    tmp_path: Path,
) -> None:
    options = {"breaker_threshold": 3, "breaker_cooldown_s": 0.6, "health_interval_s": 0.05}
    async with deployment(tmp_path, guide(), provider_options=options) as dep:
        assert dep.router is not None
        dep.sim.control({"provider": "anthropic", "fail_next": 3, "fail_with": "error-529"})
        ask = {"prompt": "write code", "task_type": "CodeGeneration", "quality": "High"}
        for _ in range(3):
            result = await dep.client.complete(**ask)
            assert result.attempts[0].provider == "claude" and result.provider != "claude"
        router = dep.router
        await until(lambda: router.views["claude"].breaker_open)
        skipped = await dep.client.complete(**ask)
        [claude] = [c for c in skipped.route.candidates if c.provider == "claude"]
        assert any("circuit breaker open" in v.reason for v in claude.verdicts)
        await until(lambda: not router.views["claude"].breaker_open)
        probe = await dep.client.complete(**ask)
        assert probe.provider == "claude"
        with anyio.fail_after(5):
            while True:
                events = [e for e in await dep.events() if isinstance(e, ProviderHealthChanged)]
                states = [e.breaker for e in events if e.provider == "claude"]
                if states[-1:] == ["closed"] and "open" in states:
                    break
                await anyio.sleep(0.05)
        assert states.index("open") < states.index("half_open") < len(states) - 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limiter_admits_rpm_with_ten_seconds_of_burst_and_honours_429s() -> None:
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock)  # one a second, ten in a burst
    assert [limiter.take() for _ in range(10)] == [0.0] * 10
    assert limiter.take() == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.take() == 0.0
    limiter.close_for(30)
    assert limiter.limited() and limiter.take() == pytest.approx(30.0)
    clock.now += 30.0
    assert not limiter.limited() and limiter.take() == 0.0
    unlimited = RateLimiter(None, clock=clock)
    assert all(unlimited.take() == 0.0 for _ in range(10_000))


def test_the_breaker_opens_after_n_failures_probes_once_and_closes_or_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.admit()
    breaker.success()  # a success resets the count
    for _ in range(3):
        breaker.failure()
    assert breaker.poll() == "open" and not breaker.admit()
    clock.now += 10.0
    assert breaker.poll() == "half_open"
    assert breaker.admit() and not breaker.admit()  # exactly one probe
    breaker.failure()
    assert breaker.poll() == "open"
    clock.now += 10.0
    assert breaker.admit()
    breaker.success()
    assert breaker.poll() == "closed" and breaker.admit() and breaker.admit()


async def test_the_configured_rpm_limits_calls_and_the_router_falls_back(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide(rpm={"claude": 6})) as dep:
        ask = {"prompt": "write code", "task_type": "CodeGeneration", "quality": "High"}
        first = await dep.client.complete(**ask)
        assert first.provider == "claude"
        second = await dep.client.complete(**ask)  # rpm 6: a burst of one, then 10 s apart
        assert second.provider != "claude"
        assert (second.attempts[0].provider, second.attempts[0].error_code) == (
            "claude",
            "rate_limited",
        )
        events = [e for e in await dep.events() if isinstance(e, ProviderHealthChanged)]
        assert any(e.provider == "claude" and e.rate_limited_until for e in events)


async def test_an_exhausted_quota_opens_the_breaker_at_once(tmp_path: Path) -> None:
    async with deployment(tmp_path, guide(models={"claude": "claude-opus-4-5-quota"})) as dep:
        assert dep.router is not None
        router = dep.router
        first = await dep.client.complete(
            prompt="write code", task_type="CodeGeneration", quality="High"
        )
        assert (first.attempts[0].provider, first.attempts[0].error_code) == (
            "claude",
            "quota_exhausted",
        )
        assert first.provider != "claude"
        await until(lambda: router.views["claude"].breaker_open)
        second = await dep.client.complete(
            prompt="write code", task_type="CodeGeneration", quality="High"
        )
        assert "claude" not in second.route.chain
