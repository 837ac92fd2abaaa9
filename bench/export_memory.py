#!/usr/bin/env python3
"""Peak memory of the export: does it stay at about one piece, whatever the depth?

    python bench/export_memory.py [--work DIR] [--keep] [--skip-full]

1. Same width, two depths (4 and 16 text layers; random weights): peak RSS of each export,
   measured in a child process (its VmHWM), and their ratio (must be < 1.2).
   Width is chosen so that a decoder layer, not the embedding, is the largest piece:
   if export kept layers alive, the deeper model would need ~4x the memory.
2. Full Llama-3.2-11B dims (hidden 4096, full 128256 vocab, bf16 random weights) at
   reduced depth (1 self + 1 cross layer, 1 local + 1 global vision layer): peak RSS of
   the text pieces (largest: embedding / lm_head, 128264 x 4096 f32 = 2.1 GB) and of the
   vit alone (its trace runs attention over 4 x 1608 patches).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mllama_tpu.export.random_checkpoint import full_config, tiny_config, write_random_checkpoint  # noqa: E402

SEQ = 512


def wide_config(layers: int) -> dict:
    """Width 2048 / MLP 8192 (a layer is ~250 MB f32), small vocab and vision."""
    cfg = tiny_config(text_layers=layers, cross_layers=tuple(i for i in range(layers) if i % 4 == 3))
    cfg["text_config"].update(hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                              num_key_value_heads=8, vocab_size=8000, eos_token_id=[7999], bos_token_id=7998,
                              pad_token_id=7997)
    cfg["image_token_index"] = 8000
    return cfg


def child(model: str, out: str, only: list[str] | None) -> None:
    """Runs in a fresh process: export, then report this process's peak RSS."""
    from mllama_tpu.export import export_model
    from mllama_tpu.export.pieces import piece_names
    from mllama_tpu.config import ModelDims

    names = piece_names(ModelDims.from_model_dir(model))
    if only == ["text"]:
        names = [n for n in names if n != "vit"]
    elif only:
        names = only
    start = time.time()
    export_model(model, out, SEQ, only=names, progress=False)
    print(json.dumps({"peak_mb": peak_rss_mb(), "seconds": time.time() - start}))


def peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM belongs to the address space made at exec; getrusage's
    ru_maxrss is not used because Linux carries the parent's peak over fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def measure(model: Path, out: Path, only: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model), str(out)] + (["--only", *only] if only else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"export child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def largest_piece_mb(out: Path) -> tuple[str, float]:
    sizes = {}
    for f in (out / "pieces").glob("*.onnx"):
        data = f.with_name(f.name + ".data")
        sizes[f.stem] = (f.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/export-bench", help="scratch dir (checkpoints + onnx)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--skip-full", action="store_true", help="only the depth ratio")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.only)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        peaks = {}
        for depth in (4, 16):
            model = write_random_checkpoint(work / f"wide{depth}", wide_config(depth), dtype=torch.bfloat16)
            r = measure(model, work / f"wide{depth}-onnx")
            piece, size = largest_piece_mb(work / f"wide{depth}-onnx")
            peaks[depth] = r["peak_mb"]
            print(f"width 2048, {depth:2d} text layers: peak RSS {r['peak_mb']:7.0f} MB  "
                  f"(largest piece {piece} {size:.0f} MB, {r['seconds']:.0f} s)", flush=True)
            shutil.rmtree(work / f"wide{depth}-onnx")
            shutil.rmtree(model)
        ratio = peaks[16] / peaks[4]
        print(f"peak ratio 16/4 layers: {ratio:.3f}  ({'OK' if ratio < 1.2 else 'FAIL'}: must be < 1.2)", flush=True)

        if not args.skip_full:
            cfg = full_config("11b", text_layers=2, cross_layers=[1], vision_layers=1, global_layers=1)
            model = write_random_checkpoint(work / "full11b", cfg, dtype=torch.bfloat16)
            out = work / "full11b-onnx"
            text = measure(model, out, ["text"])
            piece, size = largest_piece_mb(out)
            print(f"11B dims, text pieces (2 layers, vocab 128256): peak RSS {text['peak_mb']:7.0f} MB  "
                  f"(largest piece {piece} {size:.0f} MB; peak/piece {text['peak_mb'] / size:.2f}; "
                  f"{text['seconds']:.0f} s)", flush=True)
            vit = measure(model, out, ["vit"])
            print(f"11B dims, vit (1 local + 1 global layer, 4 x 1601 patches): peak RSS {vit['peak_mb']:7.0f} MB  "
                  f"({vit['seconds']:.0f} s)", flush=True)
        sys.exit(0 if ratio < 1.2 else 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
