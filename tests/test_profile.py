"""mllama_tpu.profile against profiles written by real model_deploy.py runs (BM1684X, W4BF16).

The nets are built here with TPU-MLIR's own MLIR builder (one matmul, two sizes), so the test
needs no export and runs in seconds; what is checked is what the benchmark relies on: the
estimated time, the clock, the bytes the DMA engine moves, the peak DDR bandwidth the cost
model divides by, and the per-op-kind split.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllama_tpu.profile import find_profile, parse_profile

BIN = Path(sys.executable).parent
M = 16  # tokens


def _build_matmul_mlir(d: Path, k: int, n: int) -> None:
    """Top-dialect MLIR of y = x @ W (x [1,M,k], W [k,n]) with random weights, written to d."""
    import tpu_mlir
    sys.path.insert(0, str(Path(tpu_mlir.__file__).parent / "python"))
    import mlir.dialects.top as top
    from mlir.ir import Location
    from transform.MLIRImporter import MLIRImporter, Platform

    m = MLIRImporter([[1, M, k]], [[1, M, n]], "mm", Platform.LLM, weight_file="mm_top_weights.npz")
    loc = lambda name: Location.fused([Location.name(name)], context=m.ctx)
    x = m.create_input_op(loc("x"), 0)
    w = m.create_weight_op("w", [k, n])
    y = top.MatMulOp(m.get_tensor_type([1, M, n]), x, w, m.none_op, do_relu=False, loc=loc("y"),
                     ip=m.insert_point).output
    m.create_return_op([y])
    (d / "mm.mlir").write_text(m.print_module())
    np.savez(d / "mm_top_weights.npz", w=np.random.default_rng(0).standard_normal((k, n)).astype(np.float32))


def _build_gather_mlir(d: Path, rows: int, width: int) -> None:
    """Top-dialect MLIR of an embedding lookup: table [rows,width], ids [1,M] -> [1,M,width]."""
    import tpu_mlir
    sys.path.insert(0, str(Path(tpu_mlir.__file__).parent / "python"))
    import mlir.dialects.top as top
    from mlir.ir import Location
    from transform.MLIRImporter import MLIRImporter, Platform

    m = MLIRImporter([[1, M]], [[1, M, width]], "mm", Platform.LLM, input_types=["INT32"],
                     weight_file="mm_top_weights.npz")
    loc = lambda name: Location.fused([Location.name(name)], context=m.ctx)
    ids = m.create_input_op(loc("ids"), 0)
    table = m.create_weight_op("table", [rows, width])
    y = top.GatherOp(m.get_tensor_type([1, M, width]), table, ids, axis=0, loc=loc("y"),
                     ip=m.insert_point).output
    m.create_return_op([y])
    (d / "mm.mlir").write_text(m.print_module())
    np.savez(d / "mm_top_weights.npz",
             table=np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32))


def _deploy(d: Path, k: int, n: int, gather: bool = False, quantize: str = "W4BF16"):
    d.mkdir(parents=True, exist_ok=True)
    (_build_gather_mlir if gather else _build_matmul_mlir)(d, k, n)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    group = ["--q_group_size", "64"] if quantize.startswith("W") else []
    proc = subprocess.run([str(BIN / "model_deploy.py"), "--mlir", "mm.mlir", "--chip", "bm1684x",
                           "--quantize", quantize, *group, "--model", "mm.bmodel"],
                          cwd=d, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return parse_profile(find_profile(d))


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    small = _deploy(root / "small", 1024, 2048)
    big = _deploy(root / "big", 1024, 8192)
    return small, big


@pytest.mark.slow
def test_totals_and_clock(profiles):
    small, big = profiles
    for p in (small, big):
        assert p.cycles > 0 and p.runtime_ms > 0
        # The BM1684X cost model counts at 1 GHz: runtime (ms) = cycles / 1e6.
        assert p.freq_mhz == pytest.approx(1000.0, rel=1e-3)
    # A 4x wider weight must take longer (the decode nets are weight-streaming bound).
    assert big.cycles > 2.5 * small.cycles


@pytest.mark.slow
def test_gdma_bytes_cover_the_int4_weights(profiles):
    small, big = profiles
    for p, n in ((small, 2048), (big, 8192)):
        int4_weight = 1024 * n // 2
        # Every weight byte is read from DDR once; scales/zero points and activations add a little.
        assert int4_weight <= p.gdma_bytes["S2L"] < 1.5 * int4_weight
        assert p.ddr_bytes >= p.gdma_bytes["S2L"] + p.gdma_bytes["L2S"]
        mm = p.by_kind["A16MatMul"]  # the W4BF16 matmul kernel
        assert mm.count == 1 and mm.gdma_bytes >= int4_weight and mm.bd_cycles > 0
        # Per-kind GDMA bytes add up to the summary's total.
        assert sum(k.gdma_bytes for k in p.by_kind.values()) == p.ddr_bytes


@pytest.mark.slow
def test_peak_ddr_bandwidth_is_the_cost_models(profiles):
    small, big = profiles
    # Read back from "DDR BW USAGE": the same figure for every net, 64 GiB/s.
    assert small.peak_ddr_gbps == pytest.approx(64 * 2**30 / 1e9, rel=1e-3)
    assert big.peak_ddr_gbps == pytest.approx(small.peak_ddr_gbps, rel=1e-3)
    assert 0 < big.ddr_bw_usage <= 1


@pytest.mark.slow
def test_net_without_flops_gets_its_time_from_the_clock(tmp_path):
    # A pure lookup has no FLOPs; the compiler then prints no "runtime" line (llm_convert's and
    # our embedding nets are such nets). Its time must still come out, from cycles at 1 GHz.
    p = _deploy(tmp_path, 4096, 1024, gather=True, quantize="BF16")
    text = find_profile(tmp_path).read_text()
    assert "runtime:" not in text
    assert p.flops == 0 and p.cycles > 0
    assert p.runtime_ms == pytest.approx(p.cycles / 1e6)
    # The rows it gathers (M x 1024 bf16) move through the DMA engine.
    assert p.ddr_bytes >= M * 1024 * 2
    assert p.peak_ddr_gbps == pytest.approx(64 * 2**30 / 1e9, rel=1e-3)


def test_rejects_a_file_without_a_summary(tmp_path):
    bad = tmp_path / "compiler_profile_0.txt"
    bad.write_text("not a profile\n")
    with pytest.raises(ValueError, match="TCYC"):
        parse_profile(bad)
    with pytest.raises(FileNotFoundError):
        find_profile(tmp_path / "nowhere")
