"""One provider actor in its own OS process, for the scale and kill tests::

    python -m tests.fault.provider_process NATS_URL CONFIG_FILE PROVIDER [DATA_DIR]

DATA_DIR (default: the system's temporary directory) is where it keeps held events;
``ACK_TIMEOUT_S`` in the environment shortens the event log's acknowledgement timeout (30 s) for
a test that makes the log refuse appends; ``EVENTS_PREFIX`` the subjects it appends to (a
test's own, which a subscriber there answers never: appends wait for their acknowledgement).
Prints ``ready`` once it serves; SIGTERM drains and
stops it (SIGKILL does not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import anyio

from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog, StreamSettings
from actors.provider import ProviderActor
from actors.runner import Runtime, run_until_signalled
from events.subjects import EVENTS_PREFIX
from vapora.config import load_config

ROOT = Path(__file__).resolve().parents[2]


async def started(
    url: str, config_file: Path, data_dir: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """This module run as the ``openai`` provider actor, in a process of its own, with the
    config in ``config_file`` and ``env`` (its keys and settings), once it serves."""
    command = [sys.executable, "-m", "tests.fault.provider_process", url, str(config_file)]
    worker = subprocess.Popen(
        [*command, "openai", str(data_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    with anyio.fail_after(30):
        assert worker.stdout is not None
        line = await anyio.to_thread.run_sync(worker.stdout.readline)
        assert line.strip() == b"ready"
    return worker


async def main(url: str, config_file: str, provider: str, data_dir: str | None = None) -> None:
    config = load_config(config_file, at=datetime.now(UTC))
    nc = await connect(ConnectOptions.from_url(url, name=f"provider-{provider}-{os.getpid()}"))
    try:
        runtime = Runtime(
            nc=nc,
            config=config,
            log=EventLog(
                nc,
                ack_timeout=float(os.environ.get("ACK_TIMEOUT_S", "30")),
                settings=StreamSettings(prefix=os.environ.get("EVENTS_PREFIX", EVENTS_PREFIX)),
            ),
            data_dir=Path(data_dir or tempfile.gettempdir()),
            env=dict(os.environ),
        )
        actor = ProviderActor(runtime, provider=provider)
        await run_until_signalled([actor], on_ready=lambda: print("ready", flush=True))
    finally:
        await nc.close()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
