"""``python -m vapora.simulator [--host H] [--port P] [--latency-ms N]``."""

from __future__ import annotations

import sys

from vapora.simulator.runner import cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main(sys.argv[1:]))
