"""Where vapora's CPU goes per completion: one ``vapora actor`` process per actor, closed-loop load
at a given concurrency, and each process's CPU time from ``/proc`` divided by the completions.

    python -m bench.vs_profile [--concurrency 64] [--seconds 8] [--py-spy DIR]

With ``--py-spy DIR`` (py-spy on the PATH or in ``bench/.venv-litellm/bin``) each process is also
sampled and the top frames by self time and by inclusive time are printed; the raw stacks are left
in DIR. This is the profile behind the reading in BENCHMARKS.md ("What limits each system").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nats

from bench import vs_floor, vs_procs
from bench.bench_vs_litellm import LITELLM_VENV, MODELS, PROMPT, vapora_config
from bench.vs_load import closed_loop, run_main


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    local = LITELLM_VENV / "bin" / "py-spy"
    return found or (str(local) if local.exists() else None)


def summarise(raw: Path, top: int = 12) -> str:
    """Top frames of a py-spy ``--format raw`` file by self and by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"  {total} samples; self:"]
    lines += [f"    {100 * n / total:5.1f}% {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive (vapora, actors, httpx, nats):")
    ours = [(f, n) for f, n in inclusive.most_common() if re.search(r"vapora|actors|httpx|nats", f)]
    lines += [f"    {100 * n / total:5.1f}% {f}" for f, n in ours[:top]]
    return "\n".join(lines)


async def profile(concurrency: int, seconds: float, spy_dir: Path | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vs-profile-"))
    log = tmp / "processes.log"
    sim, url = vs_procs.start_simulator(log)
    config = tmp / "vapora.toml"
    config.write_text(vapora_config(url))
    deployment = await vs_procs.vapora_split(config, tmp / "data", log, list(MODELS))
    spies: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        nc = await nats.connect(deployment.url)
        call = vs_floor.vapora_call(nc, vs_floor.vapora_request(PROMPT, "GeneralQuery", 64))
        await closed_loop(call, concurrency=8, requests=200, seconds=5)  # warm up
        procs = {c.what.removeprefix("vapora actor "): c.pid for c in deployment.children}
        procs["nats-server"] = deployment.nats.pid if deployment.nats and deployment.nats.pid else 0
        spy = py_spy() if spy_dir else None
        if spy_dir and spy:
            for name, pid in procs.items():
                if name == "nats-server":
                    continue  # not a Python process
                out = spy_dir / f"{name.replace(' ', '_').replace('-', '')}.txt"
                argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100"]
                argv += ["--format", "raw", "-o", str(out)]
                spies.append((name, subprocess.Popen(argv, stdout=subprocess.DEVNULL), out))
            await asyncio.sleep(0.5)
        before = {name: vs_procs.cpu_seconds([pid]) for name, pid in procs.items()}
        run = await closed_loop(call, concurrency=concurrency, requests=10**7, seconds=seconds)
        after = {name: vs_procs.cpu_seconds([pid]) for name, pid in procs.items()}
        s = run.summary()
        print(f"{run.ok} completions at concurrency {concurrency}: {s['per_s']:,.0f}/s, ")
        print(f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, errors {run.errors}")
        total = 0.0
        for name in procs:
            per = 1000 * (after[name] - before[name]) / max(run.ok, 1)
            total += per
            print(f"  {name:32s} {per:6.3f} ms CPU per completion")
        print(f"  {'all':32s} {total:6.3f} ms CPU per completion")
        for name, proc, out in spies:
            proc.wait()
            if out.exists():
                print(f"\n{name}:\n{summarise(out)}")
        await nc.close()
    finally:
        await deployment.stop()
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--py-spy", metavar="DIR", type=Path, help="also sample with py-spy")
    args = parser.parse_args()
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    run_main(profile(args.concurrency, args.seconds, args.py_spy))


if __name__ == "__main__":
    main()
