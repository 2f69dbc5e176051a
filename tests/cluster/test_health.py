"""The container health check (``python -m vapora.cli.health``, as docker/Dockerfile runs it):
healthy when the named service answers ``$SRV.PING``, unhealthy with a reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from nats.micro import add_service

from actors.connection import ConnectOptions, connect
from actors.server import EmbeddedNats

pytestmark = pytest.mark.anyio


async def health(
    url: str, *args: str, instances: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "vapora.cli.health", "--nats-url", url, *args]
    env = {"PATH": "/usr/bin:/bin", "VAPORA_INSTANCE_DIR": str(instances or "/nonexistent")}
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


async def test_the_instances_on_this_machine_are_asked_not_a_sibling(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """With two routers, the first reply to `$SRV.PING.router` came from either: a wedged one's
    container stayed healthy while its sibling answered. The instances this machine runs (noted
    by their processes) are each asked by id."""
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    try:
        async with await add_service(nc, name="router", version="0.1.0") as sibling:
            # This machine's router: noted, but wedged (nothing answers for its id).
            (tmp_path / "router.WEDGED.json").write_text(
                json.dumps({"name": "router", "id": "WEDGED", "pid": os.getpid()})
            )
            wedged = await health(
                nats_server.url, "--service", "router", "--timeout", "1", instances=tmp_path
            )
            assert wedged.returncode == 1, wedged.stdout
            assert "no answer to $SRV.PING.router.WEDGED" in wedged.stdout
            # This machine's router is the one that answers: healthy, asked by its id.
            (tmp_path / "router.WEDGED.json").unlink()
            (tmp_path / f"router.{sibling.id}.json").write_text(
                json.dumps({"name": "router", "id": sibling.id, "pid": os.getpid()})
            )
            ok = await health(nats_server.url, "--service", "router", instances=tmp_path)
            assert ok.returncode == 0 and f"$SRV.PING.router.{sibling.id}" in ok.stdout
            # A note left by a process that died is passed over (and removed).
            dead = tmp_path / "router.GONE.json"
            dead.write_text(json.dumps({"name": "router", "id": "GONE", "pid": 2**22 + 1}))
            assert (
                await health(nats_server.url, "--service", "router", instances=tmp_path)
            ).returncode == 0
            assert not dead.exists()
    finally:
        await nc.close()


async def test_unhealthy_with_the_reason_when_nats_is_unreachable() -> None:
    result = await health("nats://127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "unhealthy: cannot connect to NATS at nats://127.0.0.1:1" in result.stdout
