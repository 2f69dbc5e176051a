"""Where a py-spy profile's samples are: the share in telemetry frames, by entry point.

::

    py-spy record --gil -r 1000 -f raw -o traced.txt -- \\
        .venv/bin/python bench/bench_telemetry.py --trials 3 --bursts 60 --requests 20 \\
        --modes "traces 100%" --exporter none
    py-spy record --gil -r 1000 -f raw -o off.txt -- ... --modes off
    .venv/bin/python -m bench.pyspy_frames traced.txt --base off.txt

py-spy (a sampling profiler, not a dependency of vapora) writes one line per distinct stack in
its ``raw`` format: the frames joined by ``;``, then the sample count. For each stack whose frames
include one of ``--match`` (telemetry code by default), the outermost such frame is its entry
point; the report gives the samples in such stacks, each entry point's, and with ``--base`` the
samples added over another profile, all as shares of the base profile's samples (the same work
without telemetry), so that they add up.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def samples(path: Path) -> list[tuple[list[str], int]]:
    """The profile's stacks (frames outermost first, line numbers dropped) and counts."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append(([_LINE.sub(")", frame) for frame in stack.split(";")], int(count)))
    return stacks


def report(path: Path, base: Path | None, match: str, top: int) -> str:
    pattern = re.compile(match)
    stacks = samples(path)
    total = sum(count for _, count in stacks)
    denominator = sum(count for _, count in samples(base)) if base else total
    entries: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        for frame in frames:
            if pattern.search(frame):
                entries[frame] += count
                break
    matched = sum(entries.values())
    lines = [f"{path}: {total} samples"]
    if base is not None:
        added = total - denominator
        lines.append(
            f"{base}: {denominator} samples; added {added} ({100 * added / denominator:.1f} % "
            f"of it), of which in matching frames {matched} ({100 * matched / denominator:.1f} "
            f"%), elsewhere {added - matched} ({100 * (added - matched) / denominator:.1f} %)"
        )
    else:
        lines.append(f"in matching frames: {matched} ({100 * matched / total:.1f} %)")
    lines.append("entry points (outermost matching frame):")
    lines += [
        f"  {count:7d} {100 * count / denominator:5.1f} %  {frame}"
        for frame, count in entries.most_common(top)
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy raw output")
    parser.add_argument("--base", type=Path, help="the same run without what is measured")
    parser.add_argument(
        "--match",
        default=r"vapora/telemetry|actors/tracing|opentelemetry",
        help="frames counted (a regular expression over 'function (file)')",
    )
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(report(args.profile, args.base, args.match, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
