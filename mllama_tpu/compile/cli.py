"""CLI of compile/compile.sh: compile an export dir into one bmodel.

  ./compile/compile.sh --mode int4 --name llama3.2-11b --seq_length 512 [--onnx_dir tmp/onnx] [--out .]
                       [--jobs N] [--group_size 64] [--lm_head w8|float] [--chip bm1684x] [--tpu_mlir_path DIR]

Bad input: `error: ...` and exit 2. A piece that fails to compile: its name, log path and last
log lines, exit 1. Interrupted (Ctrl-C or SIGTERM): running tools are killed, exit 130; run the
same command again to resume.
"""
from __future__ import annotations

import argparse
import signal
import sys

from mllama_tpu.compile.combine import CombineError
from mllama_tpu.compile.jobs import JobFailed
from mllama_tpu.compile.policy import CHIPS, MODES
from mllama_tpu.errors import ArgumentParser, cli_main


ENV_HELP = """environment:
  MLLAMA_TPU_FREE_BYTES=N   use N as the free disk space of the output dir (tests, or to override the check)
  MLLAMA_TPU_NO_ZYGOTE=1    run model_transform.py as a plain process per piece (no shared pre-imported one)
  OMP_NUM_THREADS=N         threads per TPU-MLIR job (default: cores / jobs)
output: NAME-vision_MODE_SEQseq.bmodel, token_config/, compile_report.json, pieces/, logs/ in --out"""


def add_compile_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mode", default="int4", help=f"quantization: {', '.join(MODES)} (default int4)")
    ap.add_argument("--seq_length", type=int, required=True, help="max tokens; must match the export")
    ap.add_argument("--jobs", type=int, default=None, help="parallel piece compiles (default: cores)")
    ap.add_argument("--group_size", type=int, default=64, help="weight group size of int4/int8 (default 64)")
    ap.add_argument("--lm_head", default=None, metavar="w8|float",
                    help="lm_head precision: w8 (W8BF16, the default of int4/int8: 11B decode ~7%% faster) or "
                    "float (the activation type: BF16, F16 or F32; the default of the float modes)")
    ap.add_argument("--chip", default="bm1684x", help=f"target: {', '.join(CHIPS)} (default bm1684x)")
    ap.add_argument("--tpu_mlir_path", default=None, help="TPU-MLIR source build (with envsetup.sh); "
                    "default: the installed tpu-mlir")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="compile.sh", description="Compile exported ONNX pieces into one bmodel with TPU-MLIR.",
                 epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="model name; output NAME-vision_MODE_SEQseq.bmodel")
    ap.add_argument("--onnx_dir", default="tmp/onnx", help="export dir with manifest.json (default tmp/onnx)")
    ap.add_argument("--out", default=".", help="output dir (default .)")
    add_compile_args(ap)
    return ap


def _sigterm_as_interrupt() -> None:
    # SIGTERM takes the same path as Ctrl-C, so running tools are killed, not orphaned.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_guarded(fn) -> int:
    """Compile failures (not the user's fault) print their story and exit 1."""
    try:
        fn()
    except (JobFailed, CombineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from mllama_tpu.compile.driver import compile_model

    args = parser().parse_args(argv)
    _sigterm_as_interrupt()

    def go() -> None:
        out = compile_model(args.onnx_dir, args.mode, args.name, args.seq_length, args.out, jobs=args.jobs,
                            group_size=args.group_size, chip=args.chip, tpu_mlir_path=args.tpu_mlir_path,
                            progress=not args.no_progress, lm_head=args.lm_head)
        print(out)

    return run_guarded(go)


if __name__ == "__main__":
    cli_main(main)
