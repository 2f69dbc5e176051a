"""``python -m bench`` (``make bench``): the head-to-head benchmark, vapora vs LiteLLM vs the floor.

Arguments go to :mod:`bench.bench_vs_litellm` (``--quick`` for a short run). ``--all`` also runs
the other benchmarks afterwards in their quick form (the runtime and the provider clients).
"""

from __future__ import annotations

import subprocess
import sys

from bench import bench_vs_litellm

OTHERS = ("bench.bench_runtime", "bench.bench_providers")


def main(argv: list[str]) -> int:
    others = "--all" in argv
    code = bench_vs_litellm.main([a for a in argv if a != "--all"])
    if others:
        for module in OTHERS:
            quick = [sys.executable, "-m", module, "--quick"]
            code |= subprocess.run(quick, check=False).returncode
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
