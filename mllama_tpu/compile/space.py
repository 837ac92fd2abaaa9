"""Disk space check before a compile starts: better one line now than a full disk after an hour.

The estimate is deliberately rough but on the safe side: the per-piece bmodels and the combined
bmodel (each about the weights at the mode's bytes per weight), plus the scratch files each
running job holds (TPU-MLIR keeps the weights as f32 npz files, a couple of times over).

MLLAMA_TPU_FREE_BYTES (environment), when set, replaces the measured free space: it lets a test
(or a user who knows better) run the check without filling a disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from mllama_tpu.errors import UserError

FREE_BYTES_ENV = "MLLAMA_TPU_FREE_BYTES"
# Output bytes per byte of f32 ONNX weights, per mode (int4 keeps bf16 heads and vit).
_OUT_RATIO = {"f32": 1.0, "f16": 0.5, "bf16": 0.5, "int8": 0.3, "int4": 0.2}
_SCRATCH_RATIO = 3.0  # f32 npz of the top mlir + lowered/reordered weights of the deploy
_PIECE_OVERHEAD = 8 << 20  # each piece bmodel carries the kernel module (~5.5 MB)


def estimate_bytes(mode: str, todo_sizes: list[int], all_sizes: list[int], jobs: int) -> int:
    per_piece = sum(int(s * _OUT_RATIO[mode]) + _PIECE_OVERHEAD for s in todo_sizes)
    combined = sum(int(s * _OUT_RATIO[mode]) for s in all_sizes) + _PIECE_OVERHEAD
    scratch = int(_SCRATCH_RATIO * sum(sorted(todo_sizes, reverse=True)[:jobs]))
    return per_piece + combined + scratch


def free_bytes(path: Path) -> int:
    override = os.environ.get(FREE_BYTES_ENV)
    if override:
        try:
            return int(override)
        except ValueError:
            raise UserError(f"{FREE_BYTES_ENV}={override!r} is not a byte count; unset it") from None
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_space(out_dir: Path, need: int) -> None:
    free = free_bytes(out_dir)
    if free < need:
        raise UserError(f"not enough disk space in {out_dir}: about {need / 2**30:.1f} GiB needed, "
                        f"{free / 2**30:.1f} GiB free; free some space or pass --out on a larger disk")
