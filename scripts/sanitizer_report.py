"""Summarises the reports of scripts/run_sanitized.sh: one line per finding of our own code.

ASan errors and UBSan runtime errors always count (the vendor's known ones are suppressed in
scripts/sanitizer.supp, with reasons). Leak records count when the allocation was made in
python_demo/chat.cpp; leaks of the interpreter, numpy,
pybind11's deliberate internals and the vendor's singletons are tallied, not failed.
Usage: sanitizer_report.py REPORT_DIR COMMAND_STATUS; exits 3 on a finding, else COMMAND_STATUS.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

OURS = "python_demo/chat.cpp"
FRAME = re.compile(r"^\s+#\d+ 0x[0-9a-f]+ in (?P<fn>.*?) (?P<where>\S+)$")


def records(text: str) -> list[list[str]]:
    """Blocks separated by blank lines: one report or one leak record each."""
    return [b.splitlines() for b in re.split(r"\n\s*\n", text) if b.strip()]


def allocation_site(block: list[str]) -> str:
    """Where the reported access or allocation happened: the innermost frame that is not the
    sanitizer's or the C++ library's (an allocator called from our code is our code's; a frame
    inside a vendor library is the vendor's, even when our code called it)."""
    for line in block:
        m = FRAME.match(line)
        if not m:
            continue
        where = m["where"]
        if "libsanitizer" in where or "/c++/" in where or "libstdc++" in where:
            continue
        return where
    return ""


def main(report_dir: str, status: str) -> int:
    findings, leaks_elsewhere, files = [], 0, sorted(Path(report_dir).glob("*san.*"))
    for f in files:
        for block in records(f.read_text(errors="replace")):
            head = block[0]
            if "runtime error:" in head:
                findings.append(f"{f.name}: {head.strip()}")
            elif "ERROR: AddressSanitizer" in head:
                findings.append(f"{f.name}: {head.strip()} at {allocation_site(block) or '?'}")
            elif head.startswith(("Direct leak", "Indirect leak")):
                where = allocation_site(block)
                if OURS in where:
                    findings.append(f"{f.name}: {head.strip()} at {where}")
                else:
                    leaks_elsewhere += 1
    for line in findings:
        print(f"sanitizer: {line}")
    print(f"sanitizer: {len(findings)} finding(s) in our code; {leaks_elsewhere} leak record(s) of the "
          f"interpreter/vendor not counted; {len(files)} report file(s) in {report_dir}")
    return 3 if findings else int(status)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
