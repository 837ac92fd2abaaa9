"""One writer per output dir: export, compile and the test cache take it before they write.

Two runs into one dir (two shells running the demo, the test workers asking for the same cached
bmodel) would otherwise remove each other's half-written pieces. The second run waits, then
resumes: whatever the first finished it keeps, as any resumed run does.
"""
from __future__ import annotations

import fcntl
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def exclusive(out_dir: Path, what: str) -> Iterator[None]:
    """Hold out_dir's lock file for `what` (e.g. "compile"); wait, saying so once, if another holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f".{what}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another {what} into {out_dir} to finish", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
