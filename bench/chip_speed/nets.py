"""One compiled net as the benchmark sees it: its estimated time and the weight bytes it reads."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mllama_tpu.profile import NetProfile, find_profile, parse_profile

_WEIGHT_RE = re.compile(r"device mem size:\s*\d+\s*\(weight:\s*(\d+)")


@dataclass
class NetCost:
    name: str
    work_dir: str
    ms: float  # the cost model's estimated runtime (0 when not estimated)
    weight_bytes: int  # coefficient memory of the bmodel: what a run streams from DDR at least
    profile: NetProfile | None  # None: a dynamic net, for which the compiler writes no timeline

    @property
    def estimated(self) -> bool:
        return self.profile is not None

    def to_json(self) -> dict:
        p = self.profile
        if p is None:
            return {"ms": None, "weight_bytes": self.weight_bytes, "work_dir": self.work_dir,
                    "note": "dynamic net: the compiler writes no cycle estimate"}
        return {"ms": round(self.ms, 4), "weight_bytes": self.weight_bytes, "cycles": p.cycles,
                "ddr_bytes": p.ddr_bytes, "ddr_bw_usage": round(p.ddr_bw_usage, 4),
                "top_kinds": {k: vars(v) for k, v in p.top_kinds(6)}, "work_dir": self.work_dir}


def weight_bytes(bmodel: Path) -> int:
    """Weight (coefficient) bytes of a one-net bmodel, from `model_tool --info`."""
    tool = Path(sys.executable).parent / "model_tool"
    out = subprocess.run([str(tool), "--info", str(bmodel)], capture_output=True, text=True,
                         check=True).stdout
    m = _WEIGHT_RE.search(out)
    if not m:
        raise ValueError(f"model_tool --info {bmodel}: no 'device mem size ... weight:' line")
    return int(m[1])


def net_cost(name: str, work_dir: Path) -> NetCost:
    """Cost of the net compiled in work_dir (NAME.bmodel + compiler_profile_0.txt)."""
    work_dir = Path(work_dir)
    w = weight_bytes(work_dir / f"{name}.bmodel")
    try:
        prof = parse_profile(find_profile(work_dir))
    except ValueError:  # empty timeline: dynamic net
        return NetCost(name, str(work_dir), 0.0, w, None)
    return NetCost(name, str(work_dir), prof.runtime_ms, w, prof)
