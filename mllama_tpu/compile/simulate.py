"""Run nets of a bmodel on the BM1684X simulator (cmodel) through TPU-MLIR's `pyruntime_bm`.

Used to check a compiled bmodel net by net against onnxruntime on the same inputs. Runs in a
child process (`run_nets`): the cmodel keeps global state and prints to stdout, so it is kept
away from the caller (e.g. a pytest process that also loads the C++ engine).

Host values are converted to each input's dtype (f32 -> bf16/f16 where casts were stripped)
and outputs come back as float32/int32 numpy arrays, in the net's output order.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _to_device(value: np.ndarray, dtype: str) -> np.ndarray:
    """Host value -> the raw element bits of a device tensor of `dtype`."""
    if dtype == "bf16":
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        # round to nearest even, as the chip's own cast does
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    if dtype == "f16":
        return value.astype(np.float16)
    if dtype == "f32":
        return value.astype(np.float32)
    if dtype == "i32":
        return value.astype(np.int32)
    raise ValueError(f"unsupported input dtype {dtype}")


def _from_device(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "f16":
        return data.view(np.float16).astype(np.float32)
    return np.array(data)


def _serve(bmodel: str, requests: str, results: str) -> None:
    import tpu_mlir  # noqa: F401  sets TPUC_ROOT and the library paths of the wheel
    import pyruntime_bm

    model = pyruntime_bm.Model(bmodel, 0, "")
    req = np.load(requests)
    out: dict[str, np.ndarray] = {}
    for net_name in sorted({k.split("/")[0] for k in req.files}):
        net = model.Net(net_name)
        for t in net.inputs:
            key = f"{net_name}/{t.name}"
            if key not in req.files:
                raise KeyError(f"no value for input {t.name} of net {net_name}")
            value = _to_device(req[key], t.dtype)
            if value.size != t.data.size:
                raise ValueError(f"input {t.name} of net {net_name}: {value.shape} vs {t.data.shape}")
            # Copy raw bits: the buffer's numpy type need not be the element type (bf16 is uint16).
            t.data.reshape(-1).view(np.uint8)[:] = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        # forward_dynamic also runs nets TPU-MLIR made dynamic (any TopK would be); shapes are full.
        shapes = net.forward_dynamic([list(t.data.shape) for t in net.inputs])
        for i, t in enumerate(net.outputs):
            value = _from_device(t.data, t.dtype).reshape(-1)[: int(np.prod(shapes[i]))]
            out[f"{net_name}/{i}"] = value.reshape(shapes[i])
    np.savez(results, **out)


def run_nets(bmodel: str | Path, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """{net: {input name: value}} -> {net: [outputs]}, all nets run in one simulator process."""
    from mllama_tpu import REPO_ROOT

    bmodel = Path(bmodel).resolve()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="simulate-") as tmp:
        req, res = Path(tmp) / "req.npz", Path(tmp) / "res.npz"
        np.savez(req, **{f"{net}/{name}": v for net, feed in inputs.items() for name, v in feed.items()})
        proc = subprocess.run([sys.executable, "-m", "mllama_tpu.compile.simulate", str(bmodel), str(req), str(res)],
                              capture_output=True, text=True, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"simulator failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        data = np.load(res)
        outs: dict[str, list[np.ndarray]] = {}
        for net in inputs:
            n = len([k for k in data.files if k.startswith(net + "/")])
            outs[net] = [data[f"{net}/{i}"] for i in range(n)]
        return outs


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
