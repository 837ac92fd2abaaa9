"""Combine the per-piece bmodels into one file and check it before calling the compile done."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from mllama_tpu.compile.jobs import tail_lines
from mllama_tpu.compile.pieces import Piece
from mllama_tpu.compile.report import parse_device_memory, parse_model_info
from mllama_tpu.compile.tpu_mlir import Toolchain


class CombineError(Exception):
    """model_tool failed or the combined file is not what the manifest asks for."""


def combine(tc: Toolchain, bmodels: list[Path], out: Path, log: Path) -> None:
    # Written beside the target and renamed: an interrupted combine never leaves a half file
    # under the final name.
    tmp = out.with_name(f".{out.name}.partial")
    tmp.unlink(missing_ok=True)
    with open(log, "w") as f:
        cmd = tc.cmd("model_tool", "--combine", *map(str, bmodels), "-o", str(tmp))
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=tc.env, cwd=out.parent).returncode
    if rc != 0 or not tmp.is_file():
        tail = "\n".join(f"    {t}" for t in tail_lines(log))
        raise CombineError(f"model_tool --combine failed (exit {rc}); log: {log}\n{tail}")
    os.replace(tmp, out)


def model_info(tc: Toolchain, bmodel: Path) -> str:
    proc = subprocess.run(tc.cmd("model_tool", "--info", str(bmodel)), capture_output=True, text=True, env=tc.env)
    if proc.returncode != 0:
        raise CombineError(f"model_tool --info {bmodel} failed (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-500:]}")
    return proc.stdout


def device_memory(tc: Toolchain, bmodel: Path) -> dict[str, int] | None:
    return parse_device_memory(model_info(tc, bmodel))


def verify(tc: Toolchain, bmodel: Path, pieces: list[Piece]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every net of the manifest is in the file, with the manifest's input and output shapes."""
    io = parse_model_info(model_info(tc, bmodel))
    problems = []
    for p in pieces:
        got = io.get(p.net)
        if got is None:
            problems.append(f"net {p.net} missing")
            continue
        for kind, want in (("inputs", p.inputs), ("outputs", p.outputs)):
            shapes = [t["shape"] for t in got[kind]]
            if shapes != [t.shape for t in want]:
                problems.append(f"{p.net} {kind} {shapes} != manifest {[t.shape for t in want]}")
    extra = sorted(set(io) - {p.net for p in pieces})
    if extra:
        problems.append(f"unexpected nets {extra}")
    if problems:
        raise CombineError(f"{bmodel} does not match the manifest: " + "; ".join(problems))
    return io
