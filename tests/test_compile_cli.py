"""compile/compile.sh and compile/run_compile.sh as a user runs them.

Bad input: one `error: ...` line, exit 2, no traceback. A piece TPU-MLIR cannot compile: exit 1
with the piece, its log and the log's last lines. Resume: a compile killed mid-way and started
again rebuilds only what was not finished, and its bmodel is the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mllama_tpu import REPO_ROOT
from tests.conftest import TEST_PREFILL_LENGTHS
from cli_runs import one_error_line

COMPILE = str(REPO_ROOT / "compile" / "compile.sh")
RUN_COMPILE = str(REPO_ROOT / "compile" / "run_compile.sh")
SEQ = 128


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def compile_args(onnx_dir: Path, out: Path, mode: str = "f32", *extra: str) -> list[str]:
    return [COMPILE, "--mode", mode, "--name", "tiny", "--seq_length", str(SEQ), "--onnx_dir", str(onnx_dir),
            "--out", str(out), "--no_progress", *extra]


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- bad input -------------------------------------------------------------------------------

def test_unknown_mode(tmp_path: Path) -> None:
    one_error_line(run(compile_args(tmp_path, tmp_path / "out", "int3")), "unknown mode", "int4")


def test_w8_lm_head_only_with_int4_or_int8(tmp_path: Path) -> None:
    one_error_line(run(compile_args(tmp_path, tmp_path / "out", "bf16", "--lm_head", "w8")), "--lm_head w8", "int4")


def test_unknown_lm_head_precision(tmp_path: Path) -> None:
    one_error_line(run(compile_args(tmp_path, tmp_path / "out", "int4", "--lm_head", "w4")), "--lm_head 'w4'", "float")


def test_missing_onnx_dir(tmp_path: Path) -> None:
    one_error_line(run(compile_args(tmp_path / "nope", tmp_path / "out")), "does not exist", "--onnx_dir")


def test_missing_manifest(tmp_path: Path) -> None:
    one_error_line(run(compile_args(tmp_path, tmp_path / "out")), "no manifest.json")


def test_seq_length_disagrees_with_manifest(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    args = compile_args(tiny_onnx_dir, tmp_path / "out")
    args[args.index("--seq_length") + 1] = "256"
    one_error_line(run(args), "seq_length 128", "--seq_length 128")


def test_changed_onnx_is_refused(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    onnx_dir = copy_export(tiny_onnx_dir, tmp_path / "onnx")
    piece = onnx_dir / "pieces" / "lm_head.onnx"
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0x01  # same size, different bytes
    piece.write_bytes(bytes(data))
    one_error_line(run(compile_args(onnx_dir, tmp_path / "out")), "lm_head.onnx", "checksum", "re-run the export")


def test_manifest_missing_a_net_is_refused(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    onnx_dir = copy_export(tiny_onnx_dir, tmp_path / "onnx")
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    del manifest["pieces"]["block_cache_3"]
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    one_error_line(run(compile_args(onnx_dir, tmp_path / "out")), "block_cache_3")


def test_tpu_mlir_path_without_envsetup(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    proc = run(compile_args(tiny_onnx_dir, tmp_path / "out", "f32", "--tpu_mlir_path", str(tmp_path)))
    one_error_line(proc, "no envsetup.sh", "--tpu_mlir_path")


def test_tpu_mlir_missing(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    # A "source build" whose environment has no TPU-MLIR tools on PATH.
    (tmp_path / "envsetup.sh").write_text("export PATH=/usr/bin:/bin\n")
    proc = run(compile_args(tiny_onnx_dir, tmp_path / "out", "f32", "--tpu_mlir_path", str(tmp_path)))
    one_error_line(proc, "TPU-MLIR not found", "model_transform.py")


def test_not_enough_disk_space(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    # MLLAMA_TPU_FREE_BYTES replaces the measured free space (documented in mllama_tpu/compile/space.py).
    proc = run(compile_args(tiny_onnx_dir, tmp_path / "out"), env={"MLLAMA_TPU_FREE_BYTES": "1000"})
    one_error_line(proc, "not enough disk space", "GiB")
    assert not (tmp_path / "out" / "pieces").exists()  # refused before any work


def test_run_compile_without_model_path_needs_modelscope(tmp_path: Path) -> None:
    proc = subprocess.run([RUN_COMPILE, "--model_name", "llama3.2-11b", "--seq_length", "512"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    line = one_error_line(proc, "cannot download LLM-Research/Llama-3.2-11B-Vision-Instruct",
                          "modelscope not installed", "--model_path")
    assert "pip install modelscope" in line


# --- compile failures and resume (they compile pieces: slow) --------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seed_pieces(base_bmodel: Path, out: Path, drop: list[str]) -> None:
    """Start `out` from the finished pieces of a cached compile, minus `drop`."""
    shutil.copytree(base_bmodel.parent / "pieces", out / "pieces", copy_function=shutil.copy2)
    for net in drop:
        (out / "pieces" / f"{net}.bmodel").unlink()
        (out / "pieces" / f"{net}.bmodel.stamp.json").unlink()


@pytest.mark.slow
def test_failing_piece_names_its_log(tiny_onnx_dir: Path, tiny_bmodel, tmp_path: Path) -> None:
    onnx_dir = copy_export(tiny_onnx_dir, tmp_path / "onnx")
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    vocab = manifest["dims"]["vocab_size"]
    # Same I/O as the greedy head, but through Hardmax, which TPU-MLIR's ONNX front end lacks.
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["logits"], ["hard"], axis=-1),
         helper.make_node("ArgMax", ["hard"], ["idx"], axis=-1, keepdims=0),
         helper.make_node("Cast", ["idx"], ["token"], to=TensorProto.INT32)],
        "greedy_head", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])],
        [helper.make_tensor_value_info("token", TensorProto.INT32, [1])])
    piece = onnx_dir / "pieces" / "greedy_head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(piece))
    manifest["pieces"]["greedy_head"].update(sha256=_sha(piece), size=piece.stat().st_size)
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "out"
    _seed_pieces(tiny_bmodel("f32"), out, drop=["greedy_head"])
    proc = run(compile_args(onnx_dir, out, "f32", "--jobs", "1"))
    assert proc.returncode == 1, proc.stderr
    log = out / "logs" / "greedy_head.log"
    assert "piece greedy_head failed" in proc.stderr and str(log) in proc.stderr
    assert "Hardmax" in log.read_text()
    assert "Hardmax" in proc.stderr  # the last lines of the log say why
    assert "Traceback" not in proc.stderr.split("last lines of the log")[0]


_CTIME = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")


def _without_create_time(path: Path) -> bytes:
    # A bmodel records its creation time (ctime format); everything else must be identical.
    return _CTIME.sub(b"<time>", path.read_bytes())


@pytest.mark.slow
def test_killed_compile_resumes(tiny_onnx_dir: Path, tiny_bmodel, tmp_path: Path) -> None:
    base = tiny_bmodel("f32")
    out = tmp_path / "out"
    dropped = ["block_cache_0", "embedding_cache", "lm_head"]  # compiled largest first
    _seed_pieces(base, out, drop=dropped)

    # First run: killed (whole process group, SIGKILL) once the first dropped piece is done.
    proc = subprocess.Popen(compile_args(tiny_onnx_dir, out, "f32", "--jobs", "1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "pieces" / "block_cache_0.bmodel.stamp.json"
    deadline = time.monotonic() + 900
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "no piece finished before the kill"
    assert not (out / base.name).exists()
    # What was finished at the kill: every piece with a stamp (the stamp is written last).
    finished = {}
    for stamp in (out / "pieces").glob("*.stamp.json"):
        bmodel = stamp.with_name(stamp.name.removesuffix(".stamp.json"))
        finished[bmodel] = (bmodel.stat().st_mtime_ns, stamp.stat().st_mtime_ns)
    assert len(finished) >= 14

    # Second run: finishes the rest without touching what was finished.
    proc2 = run(compile_args(tiny_onnx_dir, out, "f32", "--jobs", "1"))
    assert proc2.returncode == 0, proc2.stderr
    for bmodel, mtimes in finished.items():
        stamp = bmodel.with_name(bmodel.name + ".stamp.json")
        assert (bmodel.stat().st_mtime_ns, stamp.stat().st_mtime_ns) == mtimes, f"{bmodel.name} was rebuilt"
    for net in dropped:
        assert (out / "pieces" / f"{net}.bmodel.stamp.json").is_file()
    final = out / base.name
    assert _without_create_time(final) == _without_create_time(base)
    report = json.loads((out / "compile_report.json").read_text())
    assert set(report["nets"]) == set(json.loads((base.parent / "compile_report.json").read_text())["nets"])
    assert np.all([report["nets"][n]["estimate"] is not None for n in dropped])


@pytest.mark.slow
def test_run_compile_exports_and_compiles(tiny_model_dir: Path, tiny_onnx_dir: Path, tiny_bmodel,
                                          tmp_path: Path) -> None:
    # Start from the cached export and pieces (both resumable), so only lm_head is compiled anew.
    onnx_dir = copy_export(tiny_onnx_dir, tmp_path / "onnx")
    out = tmp_path / "out"
    _seed_pieces(tiny_bmodel("f32"), out, drop=["lm_head"])
    proc = subprocess.run([RUN_COMPILE, "--model_name", "tiny", "--model_path", str(tiny_model_dir),
                           "--seq_length", str(SEQ), "--mode", "f32", "--onnx_dir", str(onnx_dir), "--out", str(out),
                           "--prefill_lengths", ",".join(map(str, TEST_PREFILL_LENGTHS)), "--no_progress"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    bmodel = out / "tiny-vision_f32_128seq.bmodel"
    assert proc.stdout.strip().splitlines()[-1] == str(bmodel)
    assert _without_create_time(bmodel) == _without_create_time(tiny_bmodel("f32"))
    assert (out / "token_config" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_tpu_mlir_source_build_env_is_used(tiny_onnx_dir: Path, tiny_bmodel, tmp_path: Path) -> None:
    # A "source build" whose envsetup.sh puts the installed TPU-MLIR tools on PATH ; the log
    # shows the tools were taken from the sourced PATH.
    bin_dir = Path(sys.executable).parent  # the venv's bin/, with TPU-MLIR's console scripts
    build = tmp_path / "tpu-mlir"
    build.mkdir()
    (build / "envsetup.sh").write_text(f'export PATH="{bin_dir}:/usr/bin:/bin"\n')
    out = tmp_path / "out"
    _seed_pieces(tiny_bmodel("f32"), out, drop=["embedding_cache"])
    proc = run(compile_args(tiny_onnx_dir, out, "f32", "--tpu_mlir_path", str(build)))
    assert proc.returncode == 0, proc.stderr
    assert _without_create_time(out / "tiny-vision_f32_128seq.bmodel") == _without_create_time(tiny_bmodel("f32"))
    log = (out / "logs" / "embedding_cache.log").read_text()
    assert f"$ {bin_dir}/model_transform.py" in log
