"""The C++ engine builds, loads from a plain `python` (rpath, no LD_LIBRARY_PATH), and turns
device and bmodel problems into Python exceptions instead of aborting the process.

Runs against the BM1684X simulator from the tpu-mlir wheel (this machine has no chip). Every
check that could abort runs in a child process, so an abort fails the test instead of pytest.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from mllama_tpu import REPO_ROOT

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_engine.sh"
BUILD_DIR = REPO_ROOT / "python_demo" / "build"


def tpu_mlir_lib() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("tpu_mlir")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).resolve().parent / "lib"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHON"] = sys.executable
    return env


def run_py(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Python in a child with the build dir on sys.path and no LD_LIBRARY_PATH."""
    prelude = f"import sys; sys.path.insert(0, {str(BUILD_DIR)!r}); sys.path.insert(0, {str(REPO_ROOT)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(), cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def module_path() -> Path:
    res = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900, env=clean_env())
    assert res.returncode == 0, res.stderr
    found = sorted(BUILD_DIR.glob("chat*.so"))
    assert found, f"no chat*.so in {BUILD_DIR}"
    return found[0]


def test_build_is_idempotent_and_quick(module_path):
    before = module_path.stat().st_mtime
    t0 = time.perf_counter()
    res = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=120, env=clean_env())
    took = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stderr
    assert took < 5, f"an up-to-date check took {took:.1f}s"
    assert module_path.stat().st_mtime == before


def test_rpath_points_into_the_wheel_and_host_glibc_is_used(module_path):
    dyn = subprocess.run(["readelf", "-d", str(module_path)], capture_output=True, text=True, check=True).stdout
    rpath = re.search(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dyn)
    assert rpath, dyn
    assert str(tpu_mlir_lib()) in rpath.group(1).split(":")
    assert "third_party" not in rpath.group(1)
    ldd = subprocess.run(["ldd", str(module_path)], capture_output=True, text=True, check=True,
                         env=clean_env()).stdout
    libs = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    assert Path(libs["libbmrt.so.1.0"]).resolve().parent == tpu_mlir_lib()
    assert Path(libs["libbmlib.so.0"]).resolve().parent == tpu_mlir_lib()
    assert "tpu_mlir" not in libs["libc.so.6"], f"glibc from the wheel: {libs['libc.so.6']}"


def test_module_imports_and_reports_its_interface(module_path):
    res = run_py("""
        import chat
        e = chat.Mllama()
        print(e.ready, sorted(n for n in dir(e) if not n.startswith("_")))
    """)
    assert res.returncode == 0, res.stderr
    ready, _, names = res.stdout.strip().partition(" ")
    assert ready == "False"
    for name in ("init", "deinit", "encode_image", "prefill_chunk", "decode", "decode_self_mask", "PREFILL_LENGTHS",
                 "decode_cross_masks", "net_io", "net_stats", "memory_info", "SEQLEN", "position"):
        assert f"'{name}'" in names, name
    # Sampling rules are Python's alone (mllama_tpu/sampling.py): the binding has no settings or defaults.
    assert "sampling" not in names


def test_bad_device_id_is_an_exception_not_an_abort(module_path, tmp_path):
    res = run_py(f"""
        import chat
        from mllama_tpu.engines import open_engine
        from mllama_tpu.errors import UserError
        from mllama_tpu.contract import engine_spec
        e = chat.Mllama()
        try:
            e.init(7, "{tmp_path / 'x.bmodel'}", engine_spec())
        except ValueError as err:
            print("ValueError:", err)
        # A whole bmodel by its header (mllama_tpu.bmodel_file checks that first), on no device.
        import struct
        from mllama_tpu.bmodel_file import MAGIC
        open("{tmp_path / 'x.bmodel'}", "wb").write(struct.pack("<IIIQ", MAGIC, 64, 1, 0).ljust(65, b"\\0"))
        try:
            open_engine("bmodel", "{tmp_path / 'x.bmodel'}", 7)
        except UserError as err:
            print("UserError:", err)
    """)
    assert res.returncode == 0, res.stderr
    assert "ValueError: device id 7 does not exist (1 device(s)" in res.stdout
    assert "UserError: cannot load" in res.stdout and "device id 7 does not exist" in res.stdout


def test_unreadable_bmodel_is_an_exception(module_path, tmp_path):
    bad = tmp_path / "garbage.bmodel"
    bad.write_bytes(b"\0" * 4096)
    res = run_py(f"""
        import chat
        from mllama_tpu.contract import engine_spec
        e = chat.Mllama()
        try:
            e.init(0, "{bad}", engine_spec())
        except RuntimeError as err:
            print("RuntimeError:", err)
        print("ready:", e.ready)
    """)
    assert res.returncode == 0, res.stderr
    assert f"RuntimeError: bmrt_load_bmodel failed for {bad}" in res.stdout
    assert "ready: False" in res.stdout


@pytest.fixture(scope="module")
def non_contract_bmodel(tmp_path_factory) -> Path:
    """A real bmodel whose only net is called `embedding` but takes `x`, not `input_ids`."""
    import torch

    work = tmp_path_factory.mktemp("non-contract")

    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is what we use
        torch.onnx.export(Twice(), (torch.zeros(1, 8),), str(work / "embedding.onnx"), input_names=["x"],
                          output_names=["y"], dynamo=False)
    bindir = Path(sys.executable).parent
    env = {**clean_env(), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in (
        [str(bindir / "model_transform.py"), "--model_name", "embedding", "--model_def", "embedding.onnx",
         "--input_shapes", "[[1,8]]", "--mlir", "embedding.mlir"],
        [str(bindir / "model_deploy.py"), "--mlir", "embedding.mlir", "--quantize", "F32", "--chip", "bm1684x",
         "--model", "embedding.bmodel"],
    ):
        res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return work / "embedding.bmodel"


@pytest.mark.slow
def test_non_contract_bmodel_names_what_is_missing(module_path, non_contract_bmodel):
    res = run_py(f"""
        import chat
        from mllama_tpu.contract import engine_spec
        e = chat.Mllama()
        try:
            e.init(0, "{non_contract_bmodel}", engine_spec())
        except ValueError as err:
            print("ValueError:", err)
        print("ready:", e.ready)
    """)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ValueError:"))
    assert "is not an mllama-tpu bmodel" in line
    for missing in ("net 'vit'", "input 'input_ids' of net 'embedding'", "net 'embedding_cache'", "net 'lm_head'",
                    "net 'greedy_head'", "net 'penalty_sample_head'", "(no decoder layers)"):
        assert missing in line, f"{missing} not named in: {line}"
    assert "ready: False" in res.stdout


def test_host_dtype_conversions_match_numpy_and_torch(module_path):
    """When two nets disagree on a dtype the engine converts on the host: round to nearest even,
    like torch (bf16) and numpy (f16), including subnormals, overflow and NaN."""
    res = run_py("""
        import numpy as np, torch, chat
        rng = np.random.default_rng(0)
        x = np.concatenate([
            rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
            np.array([0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-45, np.inf, -np.inf, -10000.0,
                      1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -9, 1.0 + 2.0 ** -11], np.float32)]).astype(np.float32)
        back, codes = chat.host_roundtrip(x, "bf16")
        want = torch.from_numpy(x).to(torch.bfloat16)
        assert np.array_equal(codes, want.view(torch.int16).numpy().view(np.uint16)), "bf16 codes"
        assert np.array_equal(back, want.to(torch.float32).numpy()), "bf16 values"
        back, codes = chat.host_roundtrip(x, "f16")
        want = x.astype(np.float16)
        assert np.array_equal(codes, want.view(np.uint16)), "f16 codes"
        assert np.array_equal(back, want.astype(np.float32)), "f16 values"
        nan_back, _ = chat.host_roundtrip(np.array([np.nan], np.float32), "bf16")
        assert np.isnan(nan_back[0])
        nan_back, _ = chat.host_roundtrip(np.array([np.nan], np.float32), "f16")
        assert np.isnan(nan_back[0])
        print("ok")
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
