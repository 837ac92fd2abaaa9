"""CLI of compile/run_compile.sh: checkpoint -> ONNX export -> bmodel, in one command.

  ./compile/run_compile.sh --model_name llama3.2-11b --seq_length 512 [--model_path DIR] [--mode int4]
                           [--tpu_mlir_path DIR] [--out DIR] [--onnx_dir DIR] [--jobs N] [--group_size 64]
                           [--prefill_lengths 64,128,512]

Without --model_path the checkpoint is downloaded with ModelScope's own client (as the original
project did); with --tpu_mlir_path a TPU-MLIR source build is used (its envsetup.sh is sourced),
else the installed tpu-mlir. Flags are checked and TPU-MLIR is found before the long export.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mllama_tpu.compile import policy
from mllama_tpu.compile.cli import ENV_HELP, _sigterm_as_interrupt, add_compile_args, run_guarded
from mllama_tpu.errors import ArgumentParser, UserError, cli_main
from mllama_tpu.export.flags import add_prefill_lengths, parse_prefill_lengths

# ModelScope ids of the instruct checkpoints, by the names the original project used.
MODELSCOPE_IDS = {
    "llama3.2-11b": "LLM-Research/Llama-3.2-11B-Vision-Instruct",
    "llama3.2-90b": "LLM-Research/Llama-3.2-90B-Vision-Instruct",
}


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="run_compile.sh", description="Export a Mllama checkpoint and compile it into one bmodel.",
                 epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", required=True, help="e.g. llama3.2-11b; output NAME-vision_MODE_SEQseq.bmodel")
    ap.add_argument("--model_path", default=None, help="HF checkpoint dir (default: download with modelscope)")
    ap.add_argument("--onnx_dir", default="tmp/onnx", help="export dir (default tmp/onnx)")
    ap.add_argument("--out", default=".", help="output dir of the bmodel (default .)")
    add_compile_args(ap)
    add_prefill_lengths(ap)
    return ap


def download(model_name: str, dest: Path) -> Path:
    """Fetch the checkpoint with ModelScope's client; one clear line when that is impossible."""
    model_id = MODELSCOPE_IDS.get(model_name)
    if model_id is None:
        raise UserError(f"no download source for --model_name {model_name!r} (known: {', '.join(MODELSCOPE_IDS)}); "
                        f"pass --model_path with a downloaded checkpoint")
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise UserError(f"cannot download {model_id}: modelscope not installed (pip install modelscope) "
                        f"and it needs network; pass --model_path with a downloaded checkpoint") from None
    local = dest / model_id.split("/")[-1]
    try:
        return Path(snapshot_download(model_id, local_dir=str(local)))
    except Exception as e:  # noqa: BLE001 - network, auth, disk: the user must act, not us
        raise UserError(f"cannot download {model_id}: {type(e).__name__}: {e}; "
                        f"check the network or pass --model_path") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    policy.check_mode(args.mode)
    policy.check_chip(args.chip)
    policy.check_group_size(args.group_size)
    policy.lm_head_precision(args.mode, args.lm_head)
    lengths = parse_prefill_lengths(args.prefill_lengths)
    _sigterm_as_interrupt()
    model_path = Path(args.model_path) if args.model_path else download(args.model_name, Path("."))

    from mllama_tpu.compile.driver import compile_model
    from mllama_tpu.compile.tpu_mlir import find_toolchain
    from mllama_tpu.export import export_model

    find_toolchain(args.tpu_mlir_path)  # fail now, not after an hour of export
    manifest = export_model(model_path, args.onnx_dir, args.seq_length, prefill_lengths=lengths)

    def go() -> None:
        out = compile_model(manifest.parent, args.mode, args.model_name, args.seq_length, args.out,
                            jobs=args.jobs, group_size=args.group_size, chip=args.chip,
                            tpu_mlir_path=args.tpu_mlir_path, progress=not args.no_progress,
                            lm_head=args.lm_head)
        print(out)

    return run_guarded(go)


if __name__ == "__main__":
    cli_main(main)
