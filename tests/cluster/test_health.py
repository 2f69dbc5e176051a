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
from actors.instances import process_start, server_identity
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
    container stayed healthy while its sibling answered. The instances this machine runs on this
    NATS deployment (noted by their processes) are each asked by id."""
    nc = await connect(ConnectOptions.from_url(nats_server.url))
    here = server_identity(nc._server_info)

    def note(id_: str, *, pid: int | None = None, server: str | None = here) -> Path:
        path = tmp_path / f"router.{id_}.json"
        pid = os.getpid() if pid is None else pid
        started = process_start(os.getpid())  # a live process's start (of this one)
        path.write_text(
            json.dumps(
                {"name": "router", "id": id_, "pid": pid, "started": started, "server": server}
            )
        )
        return path

    async def check(*args: str) -> subprocess.CompletedProcess[str]:
        return await health(nats_server.url, "--service", "router", *args, instances=tmp_path)

    try:
        async with await add_service(nc, name="router", version="0.1.0") as sibling:
            wedged = note("WEDGED")  # this machine's router, answering nothing
            refused = await check("--timeout", "1")
            assert refused.returncode == 1, refused.stdout
            assert "no answer to $SRV.PING.router.WEDGED" in refused.stdout
            wedged.unlink()
            note(sibling.id)  # this machine's router is the one that answers: asked by its id
            ok = await check()
            assert ok.returncode == 0 and f"$SRV.PING.router.{sibling.id}" in ok.stdout
            # Passed over: another deployment's router (another NATS server), and a note left
            # by a killed process whose pid another process has now (a restarted container).
            elsewhere = note("ELSEWHERE", server="another-nats-server")
            reused = note("REUSED", pid=1)  # pid 1 runs, but did not start when this note says
            ok = await check()
            assert ok.returncode == 0 and "ELSEWHERE" not in ok.stdout, ok.stdout
            assert elsewhere.exists() and not reused.exists()
    finally:
        await nc.close()


async def test_unhealthy_with_the_reason_when_nats_is_unreachable() -> None:
    result = await health("nats://127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "unhealthy: cannot connect to NATS at nats://127.0.0.1:1" in result.stdout


def test_an_instance_directory_that_cannot_be_written_is_said_aloud(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Logged at debug only: the container's health check then asked any sibling instance
    # instead of its own, without a word to the operator who set the variable.
    from actors.instances import register

    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("VAPORA_INSTANCE_DIR", str(afile))
    assert register("vapora-router", "abc", None) is None
    assert any(
        r.levelname == "WARNING" and "instance not noted" in r.getMessage() for r in caplog.records
    )
