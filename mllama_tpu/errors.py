"""One way to report a user's mistake: a single line and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input from the user (path, flag, file). The message is the whole story: what, where, what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2 under cli_main) like every other bad input."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def cli_main(fn: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point; a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        code = fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
