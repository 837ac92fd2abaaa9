"""The export's own flag, shared by compile/export_onnx.py and compile/run_compile.sh."""
from __future__ import annotations

import argparse

from mllama_tpu.contract import DEFAULT_PREFILL_LENGTHS
from mllama_tpu.errors import UserError


DEFAULT_TEXT = ",".join(map(str, DEFAULT_PREFILL_LENGTHS))


def add_prefill_lengths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill_lengths", default=None,
                        help=f"chunk lengths of the prefill nets, comma-separated (default {DEFAULT_TEXT}, "
                             "each cut to the seq_length)")


def parse_prefill_lengths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part, 10) for part in text.split(","))
    except ValueError:
        raise UserError(f"--prefill_lengths {text!r} is not a list of integers; pass e.g. {DEFAULT_TEXT}") from None
