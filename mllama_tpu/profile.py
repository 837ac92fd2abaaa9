"""Read TPU-MLIR's cycle-level estimate of one compiled net (compiler_profile_0.txt).

Every `model_deploy.py` run for a BM1684X net writes `compiler_profile_0.txt` into its working
directory: the timeline the compiler's cost model predicts for the chip, one command per line,
in two columns (ENGINE_BD = the compute engine, ENGINE_GDMA = the DMA engine), then a summary:

    API_END total_cycle:37208|b:9|g:9
    TCYC : 37208
    GDMA SUMMARY : |dr[0] S2L:1310720|dr[1] L2S:229376|dr[2] S2S:0|dr[3] L2L:0
    DDR BW USAGE : 60.23260169%
    flops: 67108864, runtime: 0.037208ms, ComputationAbility: 1.803614T

With no chip here this is the most honest speed measure we have. The parser needs nothing
from TPU-MLIR, so the benchmark and compile reports can use it on any saved profile.

Derived figures and why they are trustworthy:
- frequency: TCYC / runtime, i.e. the clock the cost model converts cycles with (1 GHz on
  BM1684X in tpu-mlir 1.30.2).
- peak DDR bandwidth: the summary's "DDR BW USAGE" is (bytes moved by GDMA) / (time) / peak,
  so peak = bytes / time / usage. Reading it back this way gives the exact figure the cost
  model divides by (64 GiB/s = 68.72 GB/s on BM1684X) instead of a datasheet guess.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# One timeline command: "<OpName>_<id>|<CMD>|s:..|b:..|g:..|e:..|t:..[|dr:..|sz:..|bw:..]"
_CMD_RE = re.compile(
    r"(?P<op>[A-Za-z0-9_.\-]+?)(?:_(?P<id>\d+))?\|(?P<cmd>[A-Z0-9_]+)\|s:(?P<s>\d+)\|b:\d+\|g:\d+"
    r"\|e:(?P<e>\d+)\|t:(?P<t>\d+)(?:\|dr:(?P<dr>\d+)\|sz:(?P<sz>\d+))?")
_TCYC_RE = re.compile(r"^TCYC\s*:\s*(\d+)")
_GDMA_RE = re.compile(r"dr\[(\d)\]\s*(\w+):(\d+)")
_USAGE_RE = re.compile(r"DDR BW USAGE\s*:\s*([0-9.]+)%")
_RUNTIME_RE = re.compile(r"flops:\s*(\d+),\s*runtime:\s*([0-9.]+)ms")

# The clock of the BM1684X cost model (every profile with a runtime line gives cycles/runtime
# = 1 GHz); used only for nets whose profile has no runtime line.
BM1684X_MHZ = 1000.0

# GDMA directions as printed in the summary: system memory (DDR) <-> local memory.
DDR_READ_DIRS = ("S2L", "S2S")
DDR_WRITE_DIRS = ("L2S", "S2S")


@dataclass
class OpKindCost:
    """Cycles the timeline spends on one op kind (e.g. A16MatMul), per engine."""
    bd_cycles: int = 0
    gdma_cycles: int = 0
    gdma_bytes: int = 0
    count: int = 0  # distinct op instances


@dataclass
class NetProfile:
    """Totals of one compiler_profile file (a net may hold several subnets: summed)."""
    path: str
    cycles: int
    runtime_ms: float
    flops: int
    gdma_bytes: dict[str, int]  # direction name (S2L, L2S, S2S, L2L) -> bytes
    ddr_bw_usage: float  # fraction 0..1 of the peak, as the cost model reports it
    by_kind: dict[str, OpKindCost] = field(default_factory=dict)

    @property
    def freq_mhz(self) -> float:
        return self.cycles / (self.runtime_ms * 1e3) if self.runtime_ms else 0.0

    @property
    def ddr_bytes(self) -> int:
        """Bytes that crossed the DDR interface (reads from + writes to system memory; a
        DDR-to-DDR copy counts twice, as the cost model's usage figure counts it)."""
        g = self.gdma_bytes
        return g.get("S2L", 0) + g.get("L2S", 0) + 2 * g.get("S2S", 0)

    @property
    def peak_ddr_gbps(self) -> float:
        """Peak DDR bandwidth (1e9 B/s) the cost model assumed, read back from its usage %."""
        if not self.ddr_bw_usage or not self.runtime_ms:
            return 0.0
        return self.ddr_bytes / (self.runtime_ms * 1e-3) / self.ddr_bw_usage / 1e9

    def top_kinds(self, n: int = 8) -> list[tuple[str, OpKindCost]]:
        """Op kinds by the longer of their two engines' busy time (what bounds them)."""
        items = sorted(self.by_kind.items(),
                       key=lambda kv: -max(kv[1].bd_cycles, kv[1].gdma_cycles))
        return items[:n]

    def to_json(self) -> dict:
        return {
            "path": self.path, "cycles": self.cycles, "runtime_ms": self.runtime_ms,
            "freq_mhz": round(self.freq_mhz, 3), "flops": self.flops,
            "gdma_bytes": self.gdma_bytes, "ddr_bytes": self.ddr_bytes,
            "ddr_bw_usage": self.ddr_bw_usage, "peak_ddr_gbps": round(self.peak_ddr_gbps, 3),
            "by_kind": {k: vars(v) for k, v in self.top_kinds(len(self.by_kind))},
        }


def parse_profile(path: str | Path) -> NetProfile:
    """Parse one compiler_profile_N.txt. Raises ValueError if it holds no summary."""
    path = Path(path)
    flops = 0
    gdma: dict[str, int] = defaultdict(int)
    # One entry per subnet summary: [cycles, usage, runtime_ms or None]. A net with no FLOPs
    # (a pure Gather) gets no "flops/runtime" line, so its time comes from cycles and the clock.
    subnets: list[list] = []
    kinds: dict[str, OpKindCost] = defaultdict(OpKindCost)
    seen_ops: set[tuple[str, str]] = set()
    for line in path.read_text(errors="replace").splitlines():
        # A timeline row holds a BD command, a GDMA command, or both side by side.
        for m in _CMD_RE.finditer(line):
            kind = m["op"]
            cost = kinds[kind]
            t = int(m["t"])
            if m["sz"] is not None:  # GDMA commands carry direction and size
                cost.gdma_cycles += t
                cost.gdma_bytes += int(m["sz"])
            else:
                cost.bd_cycles += t
            key = (kind, m["id"] or "")
            if key not in seen_ops:
                seen_ops.add(key)
                cost.count += 1
        if m := _TCYC_RE.match(line):
            subnets.append([int(m[1]), 0.0, None])
        elif not subnets:
            continue
        elif line.startswith("GDMA SUMMARY"):
            for d, name, n in _GDMA_RE.findall(line):
                gdma[name] += int(n)
        elif m := _USAGE_RE.search(line):
            subnets[-1][1] = float(m[1]) / 100.0
        elif m := _RUNTIME_RE.search(line):
            flops += int(m[1])
            subnets[-1][2] = float(m[2])
    if not subnets:
        raise ValueError(f"{path}: no 'TCYC' summary line; is this a compiler_profile file?")
    cycles = sum(c for c, _, _ in subnets)
    runtime_ms = sum(rt if rt is not None else c / (BM1684X_MHZ * 1e3) for c, _, rt in subnets)
    usage = sum(c * u for c, u, _ in subnets) / cycles if cycles else 0.0
    return NetProfile(str(path), cycles, runtime_ms, flops, dict(gdma), usage, dict(kinds))


def find_profile(work_dir: str | Path) -> Path:
    """The profile model_deploy left in a net's working directory."""
    work_dir = Path(work_dir)
    hits = sorted(work_dir.glob("compiler_profile_*.txt"))
    if not hits:
        raise FileNotFoundError(f"no compiler_profile_*.txt in {work_dir}")
    return hits[0]
