"""The container health check (``python -m vapora.cli.health``, as docker/Dockerfile runs it):
healthy when the named service answers ``$SRV.PING``, unhealthy with a reason otherwise."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest
from nats.micro import add_service

from actors.connection import ConnectOptions, connect
from actors.server import EmbeddedNats

pytestmark = pytest.mark.anyio


async def health(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vapora.cli.health", "--nats-url", url, *args]
    env = {"PATH": "/usr/bin:/bin"}
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    )


async def test_healthy_when_the_service_answers_ping(nats_server: EmbeddedNats) -> None:
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    try:
        async with await add_service(nc, name="router", version="0.1.0"):
            result = await health(nats_server.url, "--service", "router")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "healthy: router" in result.stdout
            other = await health(nats_server.url, "--service", "vapora-ledger", "--timeout", "1")
            assert other.returncode == 1 and "unhealthy: no answer" in other.stdout
    finally:
        await nc.close()


async def test_unhealthy_with_the_reason_when_nats_is_unreachable() -> None:
    result = await health("nats://127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "unhealthy: cannot connect to NATS at nats://127.0.0.1:1" in result.stdout
