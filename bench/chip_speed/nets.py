"""One compiled net as the benchmark sees it: its estimated time and the weight bytes it reads."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mllama_tpu.compile.report import parse_device_memory
from mllama_tpu.profile import NetProfile, find_profile, parse_profile


@dataclass
class NetCost:
    name: str
    work_dir: str
    ms: float  # the cost model's estimated runtime (0 when not estimated)
    weight_bytes: int  # coefficient memory of the bmodel: what a run streams from DDR at least
    profile: NetProfile | None  # None: a dynamic net, for which the compiler writes no timeline
    compile_s: dict | None = None  # wall seconds of model_transform / model_deploy, when recorded
    device_memory: dict | None = None  # model_tool --info: weight, instruct, runtime bytes

    @property
    def estimated(self) -> bool:
        return self.profile is not None

    def to_json(self) -> dict:
        p = self.profile
        timing = {"compile_s": self.compile_s} if self.compile_s else {}
        timing["device_memory"] = self.device_memory
        if p is None:
            return {"ms": None, "weight_bytes": self.weight_bytes, "work_dir": self.work_dir,
                    "note": "dynamic net: the compiler writes no cycle estimate", **timing}
        return {"ms": round(self.ms, 4), "weight_bytes": self.weight_bytes, "cycles": p.cycles,
                "ddr_bytes": p.ddr_bytes, "ddr_bw_usage": round(p.ddr_bw_usage, 4),
                "top_kinds": {k: vars(v) for k, v in p.top_kinds(6)}, "work_dir": self.work_dir,
                **timing}


def device_memory(bmodel: Path) -> dict[str, int]:
    """Device memory of a one-net bmodel (weight = coefficients, instruct, runtime), by
    `model_tool --info`."""
    tool = Path(sys.executable).parent / "model_tool"
    out = subprocess.run([str(tool), "--info", str(bmodel)], capture_output=True, text=True,
                         check=True).stdout
    mem = parse_device_memory(out)
    if mem is None:
        raise ValueError(f"model_tool --info {bmodel}: no 'device mem size' line")
    return mem


def net_cost(name: str, work_dir: Path) -> NetCost:
    """Cost of the net compiled in work_dir (NAME.bmodel + compiler_profile_0.txt)."""
    work_dir = Path(work_dir)
    mem = device_memory(work_dir / f"{name}.bmodel")
    timing = work_dir / "compile_time.json"
    compile_s = json.loads(timing.read_text()) if timing.exists() else None
    try:
        prof = parse_profile(find_profile(work_dir))
    except ValueError:  # empty timeline: dynamic net
        return NetCost(name, str(work_dir), 0.0, mem["weight"], None, compile_s, mem)
    return NetCost(name, str(work_dir), prof.runtime_ms, mem["weight"], prof, compile_s, mem)
