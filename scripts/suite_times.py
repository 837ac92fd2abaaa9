"""Per-file test time from pytest's JUnit XML: what docs/testing.md's time table is made from.

    ./run_tests.sh -v --durations=0 --junitxml=after.xml
    .venv/bin/python scripts/suite_times.py after.xml [before.xml]

A file's time is the sum of its tests' times (setup, call and teardown) on the worker that ran
it; with two workers the files overlap, so the sum over files exceeds the wall time.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def seconds_per_file(junit_xml: str) -> dict[str, float]:
    per_file: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit_xml).iter("testcase"):
        module = case.get("classname", "").split(".")
        name = next((m for m in module if m.startswith("test_")), module[-1])
        per_file[name + ".py"] += float(case.get("time", 0))
    return dict(per_file)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: suite_times.py AFTER.xml [BEFORE.xml]", file=sys.stderr)
        return 2
    after = seconds_per_file(argv[0])
    before = seconds_per_file(argv[1]) if len(argv) == 2 else {}
    print("| file | before, s | after, s |" if before else "| file | s |")
    print("|---|---|---|" if before else "|---|---|")
    for name in sorted(after, key=after.get, reverse=True):
        old = f"{before[name]:.1f} | " if name in before else ("— | " if before else "")
        print(f"| `{name}` | {old}{after[name]:.1f} |")
    total_old = f"{sum(before.values()):.0f} | " if before else ""
    print(f"| sum | {total_old}{sum(after.values()):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
