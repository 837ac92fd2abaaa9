#!/usr/bin/env python3
"""Export a Mllama (Llama-3.2-Vision) checkpoint to static-shape ONNX pieces.

    python compile/export_onnx.py -m MODEL_DIR -s SEQ_LENGTH [-f OUT_DIR] [-d cpu|cuda]
                                  [--prefill_lengths 64,128,512]

Writes OUT_DIR/pieces/*.onnx, OUT_DIR/manifest.json and OUT_DIR/token_config/. Re-running
keeps the pieces that are already complete (checked by sha256) and redoes the rest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from mllama_tpu.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from mllama_tpu.export.flags import add_prefill_lengths, parse_prefill_lengths  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model_path", required=True, help="HF Mllama checkpoint directory")
    parser.add_argument("-s", "--seq_length", required=True, help="static sequence length (KV cache size)")
    parser.add_argument("-f", "--folder", default="./tmp/onnx", help="output directory (default ./tmp/onnx)")
    parser.add_argument("-d", "--device", default="cpu", choices=["cpu", "cuda"], help="device used to trace")
    add_prefill_lengths(parser)
    args = parser.parse_args()
    try:
        seq = int(args.seq_length, 10)
    except ValueError:
        raise UserError(f"seq_length {args.seq_length!r} is not an integer; pass e.g. -s 512") from None
    lengths = parse_prefill_lengths(args.prefill_lengths)

    from mllama_tpu.export import export_model  # heavy imports only after the flags are fine

    manifest = export_model(args.model_path, args.folder, seq, device=args.device, prefill_lengths=lengths)
    print(f"exported to {manifest.parent} (manifest: {manifest})")


if __name__ == "__main__":
    cli_main(main)
