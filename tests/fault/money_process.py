"""The budget keeper and the cost ledger in one OS process, for the fault tests.

``python -m tests.fault.money_process --nats-url URL --data-dir DIR [--daily-cents N]``
connects, builds both actors with :func:`actors.runner.build`, prints ``money ready`` once both
serve, and runs until SIGTERM (or until it is SIGKILLed or stopped, which is the point).
:class:`MoneyProcess` runs it from a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio

from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog
from actors.runner import Runtime, build, run_until_signalled
from tests.fault.money import config

READY = "money ready"
ROOT = Path(__file__).resolve().parents[2]


class MoneyProcess:
    """This module run as a process by a test; ``kill()`` is SIGKILL."""

    def __init__(self, url: str, data_dir: Path, *, daily_cents: int) -> None:
        self.url, self.data_dir, self.daily_cents = url, data_dir, daily_cents
        self.process: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        stderr = (self.data_dir / "money.log").open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fault.money_process",
                "--nats-url",
                self.url,
                "--data-dir",
                str(self.data_dir),
                "--daily-cents",
                str(self.daily_cents),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        stderr.close()
        assert self.process.stdout is not None
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(self.process.stdout.readline)
        assert line.strip() == READY, self.log_text()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(20):
                await anyio.to_thread.run_sync(self.process.wait)
            if self.process.poll() is None:
                self.kill()

    def pause(self) -> None:
        """SIGSTOP: a keeper that stalls (its messages wait unanswered) until :meth:`resume`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return (self.data_dir / "money.log").read_text()


async def main(args: argparse.Namespace) -> None:
    nc = await connect(
        ConnectOptions.from_url(args.nats_url, name="money-process", reconnect_wait=0.1)
    )
    runtime = Runtime(
        nc=nc,
        config=config(daily_cents=args.daily_cents),
        log=EventLog(nc),
        data_dir=Path(args.data_dir),
    )
    ledger, keeper = build("ledger", runtime), build("budget", runtime)
    keeper.snapshot_every = args.snapshot_every  # type: ignore[attr-defined]
    keeper.tick_s = args.tick_s  # type: ignore[attr-defined]
    await run_until_signalled([ledger, keeper], on_ready=lambda: print(READY, flush=True))
    await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--daily-cents", type=int, default=None)
    parser.add_argument("--snapshot-every", type=int, default=50)
    parser.add_argument("--tick-s", type=float, default=0.2)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    anyio.run(main, parser.parse_args())
