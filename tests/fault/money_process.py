"""The budget keeper and the cost ledger in one OS process, for the fault tests.

``python -m tests.fault.money_process --nats-url URL --data-dir DIR [--daily-cents N]``
connects, builds both actors with :func:`actors.runner.build`, prints ``money ready`` once both
serve, and runs until SIGTERM (or until it is SIGKILLed, which is the point).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from actors.connection import ConnectOptions, connect
from actors.eventlog import EventLog
from actors.runner import Runtime, build, run_until_signalled
from tests.fault.money import config

READY = "money ready"


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
