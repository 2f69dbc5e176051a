"""The embedded nats-server and connecting to NATS: ready on a free port, JetStream on, clean
stop, and clear errors instead of hangs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats
import pytest

from actors.connection import ConnectionFailed, ConnectOptions, connect
from actors.eventlog import EventLog, JetStreamUnavailable
from actors.server import DataDirInUse, EmbeddedNats, NatsServerError, find_nats_server
from vapora.errors import ConfigError

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


async def test_embedded_server_starts_with_jetstream_and_stops(tmp_path: Path) -> None:
    server = await EmbeddedNats(tmp_path).start()
    try:
        assert server.alive()
        client = await connect(ConnectOptions.from_url(server.url))
        assert (await client.jetstream().account_info()).limits is not None
        await client.close()
    finally:
        await server.stop()
    assert not server.alive()
    assert (tmp_path / "jetstream").is_dir()


async def test_data_survives_a_restart_on_the_same_port(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path) as server:
        port = server.port
        client = await connect(ConnectOptions.from_url(server.url))
        js = client.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.x", b"1")
        await client.close()
    async with EmbeddedNats(tmp_path, port=port) as server:
        client = await connect(ConnectOptions.from_url(server.url))
        assert (await client.jetstream().stream_info("KEEP")).state.messages == 1
        await client.close()


async def test_a_second_server_on_one_data_directory_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    async with EmbeddedNats(tmp_path, serving=True) as first:  # as `vapora up` runs it
        log_before = first.log_path.read_bytes()
        named = f"pid {os.getpid()}, nats-server pid {first.pid}, serving {first.url}"
        with pytest.raises(DataDirInUse, match=named) as e:
            await EmbeddedNats(tmp_path).start()
        assert e.value.url == first.url and e.value.serving
        assert first.log_path.read_bytes().startswith(log_before)  # its log not overwritten
        client = await connect(ConnectOptions.from_url(first.url))
        await client.flush()
        await client.close()
    async with EmbeddedNats(tmp_path) as again:  # stopped: the directory is free
        assert again.alive()


async def test_another_commands_private_server_is_not_offered_to_read_through(
    tmp_path: Path,
) -> None:
    """An offline command's own server goes when that command ends: a follower that read
    through it retried the gone server forever. Only a deployment's server is offered."""
    async with EmbeddedNats(tmp_path) as private:
        with pytest.raises(DataDirInUse, match="another vapora command") as e:
            await EmbeddedNats(tmp_path).start()
        assert not e.value.serving and e.value.url == private.url


async def test_a_start_cancelled_midway_leaves_no_server_holding_the_directory(
    tmp_path: Path,
) -> None:
    """A Ctrl-C while `vapora up` starts: the child server lived on, holding the directory's
    lock (it inherits it) with nobody to stop it, and every later command was refused."""
    server = EmbeddedNats(tmp_path)
    with anyio.move_on_after(0.005):
        await server.start()
    assert not server.alive()
    async with EmbeddedNats(tmp_path) as again:  # the directory is free
        assert again.alive()


_STARTER = """
import anyio, sys
from actors.server import EmbeddedNats

async def main():
    server = await EmbeddedNats(sys.argv[1], serving=True).start()
    print(server.url, flush=True)
    await anyio.sleep(600)

anyio.run(main)
"""


async def test_a_killed_starter_leaves_its_server_holding_the_directory(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert starter.stdout is not None
    url = starter.stdout.readline().strip()
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    holder = json.loads((tmp_path / "server.lock").read_text())
    try:
        # the orphaned nats-server still writes the store: a second one must not start on it
        with pytest.raises(DataDirInUse, match=url):
            await EmbeddedNats(tmp_path).start()
    finally:
        os.kill(holder["server_pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        try:
            async with EmbeddedNats(tmp_path) as again:
                assert again.alive()
            break
        except DataDirInUse:
            assert time.monotonic() < deadline, "the stopped server's lock was not released"
            await anyio.sleep(0.05)


async def test_a_server_without_jetstream_is_named_not_a_traceback(tmp_path: Path) -> None:
    conf = tmp_path / "plain.conf"
    conf.write_text('listen: "127.0.0.1:-1"\n')  # no jetstream block
    log = tmp_path / "plain.log"
    with log.open("wb") as out:
        plain = subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while b"Server is ready" not in log.read_bytes():
            assert time.monotonic() < deadline and plain.poll() is None, log.read_text()
            await anyio.sleep(0.02)
        port = log.read_text().split("Listening for client connections on 127.0.0.1:")[1].split()[0]
        url = f"nats://127.0.0.1:{port}"
        client = await connect(ConnectOptions.from_url(url))
        try:
            with pytest.raises(JetStreamUnavailable, match=f"JetStream does not answer on {url}"):
                await EventLog(client).ensure_stream(attempts=2)
        finally:
            await client.close()
        for command in (["events"], ["audit"], ["report", "--html", str(tmp_path / "r.html")]):
            done = await anyio.run_process(
                [sys.executable, "-m", "vapora.cli", *command, "--nats-url", url],
                check=False,
                cwd=ROOT,
            )
            stderr = done.stderr.decode()
            assert done.returncode == 1, (command, stderr)
            assert "Traceback" not in stderr and "run the server with JetStream on" in stderr
    finally:
        plain.terminate()
        plain.wait()


async def test_a_killed_commands_private_server_is_stopped_by_the_next_command(
    tmp_path: Path,
) -> None:
    """`timeout`/`kill` on `vapora events --follow --data-dir D` left its private nats-server
    running and holding D; since only a deployment's server may be read through, every later
    command on D was refused for good. The next one now stops such an orphan and goes on."""
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER.replace(", serving=True", ""), str(tmp_path / "nats")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert starter.stdout is not None
    starter.stdout.readline()
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    orphan = json.loads((tmp_path / "nats" / "server.lock").read_text())["server_pid"]
    done = await anyio.run_process(
        [sys.executable, "-m", "vapora.cli", "stream", "--data-dir", str(tmp_path)],
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert f"started nats-server {orphan} on" in done.stderr.decode()
    assert not _running(orphan)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited and not yet reaped by init, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_a_bad_server_config_is_reported_not_hung(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="exited at start"):
        await EmbeddedNats(tmp_path, extra_config="this is { not valid\n").start()


async def test_a_port_in_use_is_said_in_one_line_not_the_servers_whole_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NatsServerError) as failed:
            await EmbeddedNats(tmp_path, port=port).start()
    message = str(failed.value)
    assert "\n" not in message and "address already in use" in message
    assert message.startswith("nats-server exited at start: Error listening on port")


async def test_connecting_to_nothing_fails_clearly_naming_the_servers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ConnectOptions.from_url(
        "nats://127.0.0.1:1,nats://127.0.0.1:2",
        connect_timeout=0.2,
        initial_deadline=1.0,
        name="to-nothing",
    )
    caplog.set_level(logging.DEBUG, logger="vapora.nats")
    with pytest.raises(
        ConnectionFailed, match=r"nats://127.0.0.1:1, nats://127.0.0.1:2.*ConnectionRefused"
    ):
        await connect(options)
    # Said once, by the error: each try was an ERROR line before (30 of them before a CLI
    # command's one useful line, with its 15 s deadline); now a debug line, naming the
    # connection (other tests' connections may log meanwhile).
    ours = [r for r in caplog.records if "nats (to-nothing)" in r.getMessage()]
    assert ours and all(r.levelno == logging.DEBUG for r in ours), caplog.text


def test_secrets_stay_out_of_connect_options_repr() -> None:
    options = ConnectOptions(user="svc", password="hunter2-secret", token="tok-secret")
    assert "hunter2" not in repr(options) and "tok-secret" not in repr(options)
    in_urls = ConnectOptions.from_url("nats://svc:hunter2-secret@h:4222,nats://tok-secret@h2")
    assert "hunter2" not in repr(in_urls) and "tok-secret" not in repr(in_urls)
    assert "nats://svc:***@h:4222" in repr(in_urls)


async def test_a_failed_connect_does_not_quote_credentials_in_its_urls() -> None:
    options = ConnectOptions.from_url(
        "nats://svc:hunter2-secret@127.0.0.1:1,nats://tok-secret@127.0.0.1:2",
        connect_timeout=0.2,
        initial_deadline=1.0,
    )
    with pytest.raises(ConnectionFailed) as failed:
        await connect(options)
    message = str(failed.value)
    assert "hunter2" not in message and "tok-secret" not in message
    assert "nats://svc:***@127.0.0.1:1, nats://***@127.0.0.1:2" in message


async def test_a_data_directory_with_a_quote_in_its_name_is_served(tmp_path: Path) -> None:
    # Its config quoted the store with repr() and then swapped every ' for ": the server
    # could not parse `"/tmp/it"s dir/..."` and `vapora up` could not start there.
    async with EmbeddedNats(tmp_path / "it's a \\ dir" / "nats") as server:
        nc = await nats.connect(server.url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"creds_file": "/nonexistent/user.creds"}, "nats.creds: no credentials file"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "nats.tls: cannot load /nonexistent/ca.pem"),
        ({"tls_ca_file": "/etc/hostname"}, "nats.tls: cannot load /etc/hostname"),
    ],
)
async def test_credentials_or_certificates_that_cannot_be_read_are_named(
    options: dict[str, str], named: str
) -> None:
    # A traceback (a missing CA), or "unhandled errors in a TaskGroup (1 sub-exception)"
    # (a missing credentials file) that hid which file and why.
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        await connect(ConnectOptions(servers=("nats://127.0.0.1:1",), **options))
