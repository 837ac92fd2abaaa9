"""compile_report.json: what was built, how, and TPU-MLIR's own speed estimate per net.

For a static bmodel, model_deploy.py's codegen writes `compiler_profile_0.txt` into its working
directory (read by mllama_tpu.profile); the report keeps its totals: the compiler's estimate of
one run of the net.

The I/O table per net (names, shapes, dtypes after cast stripping) is read back from the
combined bmodel with `model_tool --info`, so the engine can trust it as the file's truth.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mllama_tpu.profile import parse_profile

# `model_tool --info` lines: "net 3: [block_0]  static", "input: name, [1, 16], int32, scale: ..."
_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]\s*(?P<kind>\w*)")
_SUBNETS = re.compile(r"^subnet number: (\d+)")  # printed only when a net has more than one
_IO = re.compile(r"^(?P<kind>input|output): (?P<name>.+?), \[(?P<shape>[^\]]*)\], (?P<dtype>\w+)")
# "device mem size: 7813120 (weight: 3436544, instruct: 673792, runtime: 3702784)"
_DEVICE_MEM = re.compile(r"^device mem size: (?P<total>\d+) \(weight: (?P<weight>\d+), instruct: (?P<instruct>\d+), "
                         r"runtime: (?P<runtime>\d+)\)")


def parse_device_memory(text: str) -> dict[str, int] | None:
    """What a bmodel needs in device memory, by `model_tool --info`: total, weight (coefficients;
    combine stores identical blobs once), instruct, runtime (activations); None if not printed."""
    for line in text.splitlines():
        if m := _DEVICE_MEM.match(line.strip()):
            return {k: int(v) for k, v in m.groupdict().items()}
    return None


def parse_model_info(text: str) -> dict[str, dict[str, Any]]:
    """net -> {"dynamic": bool, "subnets": int, "inputs": [...], "outputs": [...]} (first stage only)."""
    nets: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if m := _NET.match(line):
            current = nets.setdefault(m["name"], {"inputs": [], "outputs": []})
            # TPU-MLIR makes a net dynamic, or splits it into subnets, by itself when an op needs
            # it (TopK runs on the hardware sort unit, in a dynamic subnet).
            current["dynamic"] = m["kind"] == "dynamic"
            current["subnets"] = 1
            seen_stage = False
            continue
        if line.startswith("stage ") and current is not None:
            if seen_stage:  # later stages of a dynamic net: not ours, ignore
                current = None
            seen_stage = True
            continue
        if current is not None and (m := _SUBNETS.match(line)):
            current["subnets"] = int(m[1])
            continue
        if current is not None and (m := _IO.match(line)):
            # Dynamic nets print their max shape as "max:N".
            shape = [int(d.strip().removeprefix("max:")) for d in m["shape"].split(",") if d.strip()]
            current[m["kind"] + "s"].append({"name": m["name"], "shape": shape, "dtype": m["dtype"]})
    return nets


def dtype_mismatches(piece_info: dict[str, dict[str, Any]], io: dict[str, dict[str, Any]],
                     activation_dtype: str) -> list[str]:
    """Device-only tensors whose cast TPU-MLIR did not strip (they stay f32 in a bf16/f16 build).

    The engine still works (it converts through the host), but pays a copy each time; usually
    the graph puts a shape op (Expand/Tile) between the input and the first compute op.
    """
    out = []
    for net, info in piece_info.items():
        for kind, idx in (("inputs", info.get("quant_inputs", [])), ("outputs", info.get("quant_outputs", []))):
            tensors = io.get(net, {}).get(kind, [])
            for i in idx:
                if i - 1 < len(tensors) and tensors[i - 1]["dtype"] != activation_dtype:
                    out.append(f"{net}.{tensors[i - 1]['name']} is {tensors[i - 1]['dtype']}")
    return out


def build_report(*, name: str, mode: str, chip: str, group_size: int, seq_length: int,
                 activation_dtype: str, tpu_mlir: str, bmodel: Path, piece_info: dict[str, dict[str, Any]],
                 io: dict[str, dict[str, Any]], device_memory: dict[str, int] | None) -> dict[str, Any]:
    nets = {}
    for net, info in piece_info.items():
        nets[net] = {**info, **io.get(net, {})}
    total = sum((n.get("estimate") or {}).get("cycles") or 0 for n in nets.values())
    return {
        "format": 1,
        "name": name,
        "mode": mode,
        "chip": chip,
        "group_size": group_size,
        "seq_length": seq_length,
        "activation_dtype": activation_dtype,
        "tpu_mlir": tpu_mlir,
        "bmodel": bmodel.name,
        "bmodel_size": bmodel.stat().st_size,
        "device_memory": device_memory,
        "total_estimated_cycles": total,
        "device_dtype_mismatches": dtype_mismatches(piece_info, io, activation_dtype),
        "nets": nets,
    }


def net_estimate(work_dir: Path) -> dict[str, Any] | None:
    """TPU-MLIR's estimate of one run of the net compiled in `work_dir` (its subnets summed), or
    None when model_deploy wrote no profile (dynamic nets)."""
    path = work_dir / "compiler_profile_0.txt"
    if not path.is_file():
        return None
    try:
        prof = parse_profile(path)
    except ValueError:
        return None
    return {"cycles": prof.cycles, "runtime_ms": prof.runtime_ms, "flops": prof.flops}
