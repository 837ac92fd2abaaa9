"""The compiled tiny model, net by net on the BM1684X simulator, against onnxruntime on the ONNX pieces.

f32: every output within 1e-3 of the output's scale, token outputs identical.
int4, int8, bf16 and f16: block/vit/embedding outputs with cosine >= 0.99, and the lm_head -> greedy_head path on the
device picks the same token as the ONNX lm_head for real last hidden states of toy prompts.
Both: model_tool --info lists every net of the manifest with the manifest's shapes, and the
report says what was built (quantize per net, I/O dtypes the engine must use, cycle estimates).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllama_tpu.compile import parity
from mllama_tpu.compile.jobs import Job, JobFailed, JobRunner, Step
from mllama_tpu.compile.report import parse_model_info
from mllama_tpu.compile.simulate import run_nets

MODEL_TOOL = str(Path(sys.executable).parent / "model_tool")


def info(bmodel: Path) -> dict:
    out = subprocess.run([MODEL_TOOL, "--info", str(bmodel)], capture_output=True, text=True, check=True).stdout
    return parse_model_info(out)


def assert_contract(bmodel: Path, onnx_dir: Path) -> None:
    manifest = parity.load_manifest(onnx_dir)
    nets = info(bmodel)
    assert sorted(nets) == sorted(manifest["pieces"])
    for net, spec in manifest["pieces"].items():
        assert [t["shape"] for t in nets[net]["inputs"]] == [t["shape"] for t in spec["inputs"]], net
        assert [t["name"] for t in nets[net]["inputs"]] == [t["name"] for t in spec["inputs"]], net
        assert [t["shape"] for t in nets[net]["outputs"]] == [t["shape"] for t in spec["outputs"]], net


def report(bmodel: Path) -> dict:
    return json.loads((bmodel.parent / "compile_report.json").read_text())


@pytest.mark.slow
def test_f32_bmodel_matches_onnx(tiny_onnx_dir: Path, tiny_bmodel) -> None:
    bmodel = tiny_bmodel("f32")
    assert bmodel.name == "tiny-vision_f32_128seq.bmodel"
    assert (bmodel.parent / "token_config" / "tokenizer.json").is_file()
    assert_contract(bmodel, tiny_onnx_dir)
    rep = report(bmodel)
    assert rep["mode"] == "f32" and rep["activation_dtype"] == "float32"
    for net, entry in rep["nets"].items():
        assert entry["quantize"] == "F32", net
        assert all(t["dtype"] in ("float32", "int32") for t in entry["inputs"] + entry["outputs"]), net
    # Every net, the token heads included, is one static subnet with TPU-MLIR's estimate.
    for net, entry in rep["nets"].items():
        assert not entry["dynamic"] and entry["subnets"] == 1, net
        assert entry["estimate"]["cycles"] > 0, net

    checks = parity.check_nets(tiny_onnx_dir, bmodel)
    assert {c.net for c in checks} == set(rep["nets"])
    for c in checks:
        if c.is_int:
            assert c.equal, f"{c.net} output {c.index}: tokens differ"
        else:
            assert c.rel_err <= 1e-3, f"{c.net} output {c.index}: relative error {c.rel_err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("mode,block_quant,other_quant,lm_head,lm_head_quant", [
    ("int4", "W4BF16", "BF16", None, ("W8BF16", 64)), ("int8", "W8BF16", "BF16", None, ("W8BF16", 64)),
    ("bf16", "BF16", "BF16", None, ("BF16", None)), ("f16", "F16", "F16", None, ("F16", None)),
    ("int4", "W4BF16", "BF16", "float", ("BF16", None))])
def test_quantized_bmodel_close_to_onnx(tiny_onnx_dir: Path, tiny_bmodel, mode: str, block_quant: str,
                                        other_quant: str, lm_head: str | None, lm_head_quant: tuple) -> None:
    bmodel = tiny_bmodel(mode, lm_head)
    assert_contract(bmodel, tiny_onnx_dir)
    rep = report(bmodel)
    nets = rep["nets"]
    device = "float16" if mode == "f16" else "bfloat16"
    assert rep["activation_dtype"] == device
    for net in ("block_chunk64_0", "block_cache_0", "cross_kv_1"):
        assert nets[net]["quantize"] == block_quant, net
        assert nets[net]["q_group_size"] == (64 if block_quant.startswith("W") else None), net  # per-group W4/W8
    assert nets["vit"]["quantize"] == other_quant and nets["greedy_head"]["quantize"] == "F32"
    assert (nets["lm_head"]["quantize"], nets["lm_head"]["q_group_size"]) == lm_head_quant
    # Device-only tensors are bf16 (f16), host-facing ones keep f32/i32 (what the engine relies on).
    dtypes = {(n, t["name"]): t["dtype"] for n, e in nets.items() for t in e["inputs"]}
    assert dtypes[("block_cache_0", "history_k")] == device
    assert dtypes[("block_cache_0", "attention_mask")] == "float32"
    assert dtypes[("block_chunk16_0", "position_ids")] == "int32"
    assert dtypes[("block_chunk16_1", "cross_k")] == device
    assert dtypes[("lm_head", "hidden_states")] == device
    assert dtypes[("vit", "pixel_values")] == "float32"
    assert [t["dtype"] for t in nets["block_chunk16_0"]["outputs"]] == [device] * 3
    assert [t["dtype"] for t in nets["cross_kv_1"]["outputs"]] == [device] * 2
    assert nets["lm_head"]["outputs"][0]["dtype"] == "float32"

    assert rep["device_dtype_mismatches"] == []

    manifest = parity.load_manifest(tiny_onnx_dir)
    checks = parity.check_nets(tiny_onnx_dir, bmodel,
                               nets=[n for n in nets if n.startswith(("block_", "cross_kv_", "vit", "embedding"))])
    for c in checks:
        size = int(np.prod(manifest["pieces"][c.net]["outputs"][c.index]["shape"]))
        # A decode step's own K/V is 2*16 numbers in the tiny model: its cosine is a noisy
        # estimate, so that one gets a looser bound; the hidden states (what the next layer
        # sees) and every larger output must reach 0.99.
        bound = 0.99 if size >= 1024 or c.index == 0 else 0.98
        assert c.cosine >= bound, f"{c.net} output {c.index}: cosine {c.cosine:.4f}"

    # lm_head + greedy_head on the device: same token as the ONNX lm_head's argmax.
    rng = np.random.default_rng(7)
    vocab = manifest["dims"]["vocab_size"]
    prompts = [list(rng.integers(0, vocab, n)) for n in (5, 17, 40)]
    hidden = parity.text_hidden_states(tiny_onnx_dir, prompts)
    for h in hidden:
        (logits,) = parity.onnx_outputs(tiny_onnx_dir, "lm_head", {"hidden_states": h[None]})
        sim_logits = run_nets(bmodel, {"lm_head": {"hidden_states": h[None]}})["lm_head"][0]
        token = run_nets(bmodel, {"greedy_head": {"logits": sim_logits.reshape(1, -1)}})["greedy_head"][0]
        assert int(token.reshape(-1)[0]) == int(np.argmax(logits))


# --- the job runner (real processes, no compile) ---------------------------------------------

def _job(tmp: Path, name: str, code: str) -> Job:
    cmd = [sys.executable, "-c", f"import time, sys; print('start', time.time()); {code}; print('end', time.time())"]
    return Job(name, [Step(cmd)], tmp / "work" / name, tmp / "logs" / f"{name}.log", dict(os.environ), 1 << 20)


def _spans(tmp: Path, names: list[str]) -> list[tuple[float, float]]:
    spans = []
    for n in names:
        words = (tmp / "logs" / f"{n}.log").read_text().split()
        spans.append((float(words[words.index("start") + 1]), float(words[words.index("end") + 1])))
    return spans


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_jobs_run_in_parallel_up_to_the_bound(tmp_path: Path) -> None:
    names = [f"j{i}" for i in range(4)]
    runner = JobRunner(2, available=lambda: 1 << 40)
    results = runner.run([_job(tmp_path, n, "time.sleep(1.0)") for n in names])
    assert sorted(r.name for r in results) == names and all(r.ok for r in results)
    assert _max_overlap(_spans(tmp_path, names)) == min(2, os.cpu_count() or 1)


def test_jobs_wait_for_memory(tmp_path: Path) -> None:
    # Memory looks exhausted: jobs still run (one at a time), never two together.
    names = [f"m{i}" for i in range(3)]
    JobRunner(2, available=lambda: 0).run([_job(tmp_path, n, "time.sleep(0.5)") for n in names])
    assert _max_overlap(_spans(tmp_path, names)) == 1


def test_failed_job_reports_name_log_and_tail(tmp_path: Path) -> None:
    jobs = [_job(tmp_path, "bad", "print('the reason it broke'); sys.exit(3)"),
            _job(tmp_path, "later", "pass")]
    with pytest.raises(JobFailed) as info:
        JobRunner(1).run(jobs)
    err = info.value
    assert err.name == "bad" and err.log == tmp_path / "logs" / "bad.log"
    assert "the reason it broke" in str(err) and "exited with 3" in str(err)
    assert not (tmp_path / "logs" / "later.log").exists()  # nothing new starts after a failure



def test_tables_too_big_for_onnxsim_skip_it(tmp_path: Path) -> None:
    """The 11B embedding/lm_head keep their 2 GB of weights in an external data file; onnxsim on
    them needs more than 24 GB, so the compile's model_transform step must turn it off."""
    from mllama_tpu.compile import cache, driver, policy
    from mllama_tpu.compile.pieces import DataFile, Piece, TensorSpec
    from mllama_tpu.compile.tpu_mlir import find_toolchain

    def transform_cmd(size: int, external: DataFile | None) -> list[str]:
        piece = Piece("lm_head", tmp_path / "lm_head.onnx", "0" * 64, size,
                      [TensorSpec("hidden_states", [1, 4096], "float32")], [TensorSpec("logits", [1, 128256], "float32")],
                      external)
        pol = policy.piece_policy("lm_head", "int4", 64, ["hidden_states"], ["logits"])
        key = cache.StampKey(piece.digest, "int4", 64, "bm1684x", pol.to_dict(), "v")
        plan = driver._Plan(piece, pol, key, tmp_path / "lm_head.bmodel", tmp_path / "work", tmp_path / "log")
        return driver._job(plan, find_toolchain(None), "bm1684x", {}, None).steps[0].cmd

    table = DataFile(tmp_path / "lm_head.onnx.data", "1" * 64, 2_101_362_688)
    big = transform_cmd(1353, table)
    assert big[big.index("--do_onnx_sim") + 1] == ""
    assert "--do_onnx_sim" not in transform_cmd(870_000_000, None)  # a decoder block is simplified


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["f32", "int4"])
def test_more_nets_per_layer_store_its_weights_once(tiny_onnx_dir: Path, tiny_bmodel, mode: str) -> None:
    """Every step net of a layer (decode and each prefill length) holds the same coefficients, and
    the combined bmodel stores them once: its weight bytes (model_tool --info) are one copy per
    layer plus the heads, the two embeddings sharing their table."""
    from mllama_tpu import contract

    rep = report(tiny_bmodel(mode))
    nets = rep["nets"]
    groups: dict[str, set[int]] = {}
    for net, entry in nets.items():
        where = contract.layer_of(net)
        key = ("embedding" if net.startswith("embedding") else net) if where is None or where.rows is None \
            else f"layer {where.layer}"
        groups.setdefault(key, set()).add(entry["weight_bytes"])
    assert all(len(sizes) == 1 for sizes in groups.values()), groups  # same coefficients in every step net
    once = sum(next(iter(sizes)) for sizes in groups.values())
    assert rep["device_memory"]["weight"] == once < sum(e["weight_bytes"] for e in nets.values())
