"""Summarise py-spy raw (collapsed) stacks: where a process spent its samples.

    python bench/spy_summary.py FILE [--top 25] [--match outpost]

Prints the functions with the most samples inclusive (on the stack) and exclusive (at the
top), as a share of all samples. With --match, inclusive figures count only frames whose
text contains the string (for example "outpost" for the project's own functions).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")


def frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:LINE)"; drop the line number.
    return re.sub(r":\d+\)$", ")", frame.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="")
    parser.add_argument("--idle", default="EpollSelector.select,_connection_worker_thread,"
                        "Condition.wait,_worker (concurrent,_do_waitpid,Thread.join",
                        help="comma-separated leaf frames counted as idle and left out "
                        "(py-spy --nonblocking cannot always tell a waiting thread)")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for line in args.file.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames or any(i and i in frames[-1] for i in args.idle.split(",")):
            continue
        total += count
        exclusive[frames[-1]] += count
        for name in set(frames):
            if args.match in name:
                inclusive[name] += count
    print(f"{args.file.name}: {total} samples, idle ones left out")
    print("inclusive (on the stack)")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name[:150]}")
    print("exclusive (running)")
    for name, n in exclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name[:150]}")


if __name__ == "__main__":
    main()
