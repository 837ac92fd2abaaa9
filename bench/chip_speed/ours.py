"""Our side: mllama_tpu.export to ONNX pieces, then each piece through TPU-MLIR with our policy.

Each net is compiled alone in its own directory with the same commands as
mllama_tpu.compile.driver (input types, and the model_deploy.py flags
mllama_tpu.compile.policy gives that piece), so its compiler_profile_0.txt is kept (the compile
stage deletes a piece's scratch dir) and
a net whose ONNX did not change is not rebuilt. The flags are the compile stage's, so what is
measured is our export graph + our compile options.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mllama_tpu.compile.policy import piece_policy, transform_args

_BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run one TPU-MLIR tool; returns its wall seconds."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} failed (exit {rc}) in {cwd}; log {log}:\n" + "\n".join(tail))
    return time.monotonic() - t0


def _shape_arg(specs: list[dict]) -> str:
    return "[" + ",".join("[" + ",".join(str(d) for d in s["shape"]) + "]" for s in specs) + "]"


def _file_bytes(entry: dict) -> int:
    return int(entry["size"]) + int(entry.get("external_data", {}).get("size", 0))


def compile_piece(net: str, entry: dict, onnx_dir: Path, work: Path, mode: str, group: int,
                  chip: str, lm_head: str | None = None) -> Path:
    """Compile one exported piece alone; returns its working dir (bmodel + profile inside)."""
    d = work / net
    d.mkdir(parents=True, exist_ok=True)
    bmodel = d / f"{net}.bmodel"
    stamp = d / "stamp.json"
    ins = entry["inputs"]
    outs = entry["outputs"]
    pol = piece_policy(net, mode, group, [i["name"] for i in ins], [o["name"] for o in outs], lm_head)
    # As the compile stage's stamp: the flags passed decide the bmodel, not the mode's name.
    transform = transform_args(net, _file_bytes(entry))
    key = {"sha256": entry["sha256"], "chip": chip, "policy": pol.to_dict(), "transform_args": transform}
    if bmodel.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        return d
    bmodel.unlink(missing_ok=True)
    log = d / "compile.log"
    log.write_text("")
    model_def = (onnx_dir / entry["file"]).resolve()
    transform_s = _run([str(_BIN / "model_transform.py"), "--model_name", net, "--model_def", str(model_def),
          "--input_shapes", _shape_arg(ins), "--input_types", ",".join(i["dtype"] for i in ins),
          "--mlir", f"{net}.mlir", *transform], d, log)
    deploy_s = _run([str(_BIN / "model_deploy.py"), "--mlir", f"{net}.mlir", "--chip", chip,
          "--model", bmodel.name, *pol.deploy_args()], d, log)
    stamp.write_text(json.dumps(key))
    (d / "compile_time.json").write_text(json.dumps(
        {"model_transform_s": round(transform_s, 1), "model_deploy_s": round(deploy_s, 1)}))
    return d


def build_ours(ckpt: Path, work: Path, seq_length: int, nets: list[str], mode: str = "int4",
               group: int = 64, chip: str = "bm1684x", log=print,
               reuse: bool = False, lm_head: str | None = None,
               prefill_lengths: tuple[int, ...] | None = None) -> dict[str, Path]:
    """Export the named pieces (cached by the export's own manifest) and compile each.

    reuse: take a net compiled before as it is, even if the export code changed since (the
    export re-exports everything when its code changes, which takes long at 11B dims).
    """
    from mllama_tpu.export import export_model

    onnx_dir = work / "onnx"
    if reuse:
        done = {n: work / "compile" / n for n in nets
                if (work / "compile" / n / "stamp.json").exists()
                and (work / "compile" / n / f"{n}.bmodel").exists()}
        if len(done) == len(nets):
            return done
    log(f"[ours] export {', '.join(nets)}")
    manifest = json.loads(Path(export_model(ckpt, onnx_dir, seq_length, only=nets, progress=False,
                                            prefill_lengths=prefill_lengths)).read_text())
    dirs = {}
    for net in nets:
        log(f"[ours] compile {net}")
        dirs[net] = compile_piece(net, manifest["pieces"][net], onnx_dir, work / "compile",
                                  mode, group, chip, lm_head)
    return dirs
