"""compile/export_onnx.py as a user runs it: bad input -> one line + exit 2; resume keeps work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.export.random_checkpoint import tiny_config, write_random_checkpoint
from cli_runs import one_error_line

CLI = REPO_ROOT / "compile" / "export_onnx.py"


def export_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("cli") / "model", tiny_config(text_layers=2,
                                                                                           cross_layers=(1,)))


def broken_copy(src: Path, dst: Path, drop: str | None = None, config: dict | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != drop:
            (dst / f.name).symlink_to(f)
    if config is not None:
        (dst / "config.json").unlink()
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_model_dir(tmp_path):
    one_error_line(export_cli("-m", tmp_path / "nope", "-s", "16", "-f", tmp_path / "out"), "nope", "does not exist")


def test_not_mllama(tmp_path, model_dir):
    llama = {"model_type": "llama", "hidden_size": 64}
    bad = broken_copy(model_dir, tmp_path / "llama", config=llama)
    one_error_line(export_cli("-m", bad, "-s", "16", "-f", tmp_path / "out"), "not a Mllama")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(export_cli("-m", empty, "-s", "16", "-f", tmp_path / "out"), "config.json")


def test_missing_shard(tmp_path, model_dir):
    shard = sorted(model_dir.glob("*.safetensors"))[-1].name
    bad = broken_copy(model_dir, tmp_path / "partial", drop=shard)
    one_error_line(export_cli("-m", bad, "-s", "16", "-f", tmp_path / "out"), shard, "missing")


@pytest.mark.parametrize("seq,words", [("abc", ["not an integer"]), ("0", ["positive"]), ("-3", ["positive"]),
                                       ("4096", ["max_position_embeddings", "2048"])])
def test_bad_seq_length(tmp_path, model_dir, seq, words):
    one_error_line(export_cli("-m", model_dir, "-s", seq, "-f", tmp_path / "out"), *words)


@pytest.mark.parametrize("lengths,words", [("1,8", ["at least 2"]), ("8,x", ["not a list of integers"]), ("", ["not a list"])])
def test_bad_prefill_lengths(tmp_path, model_dir, lengths, words):
    one_error_line(export_cli("-m", model_dir, "-s", "16", "-f", tmp_path / "out", "--prefill_lengths", lengths),
                      "prefill_lengths", *words)


def test_unwritable_output(tmp_path, model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should go")  # root ignores chmod, so block with a file
    one_error_line(export_cli("-m", model_dir, "-s", "16", "-f", blocker / "out"), "not writable")


def test_resume_keeps_finished_and_replaces_corrupted(tmp_path, model_dir):
    out = tmp_path / "onnx"
    first = export_cli("-m", model_dir, "-s", "16", "-f", out, "--prefill_lengths", "4,8")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    files = {name: out / e["file"] for name, e in manifest["pieces"].items()}
    assert manifest["prefill_lengths"] == [4, 8]
    assert set(files) == {"embedding", "embedding_cache", "block_cache_0", "block_chunk4_0", "block_chunk8_0",
                          "cross_kv_1", "block_cache_1", "block_chunk4_1", "block_chunk8_1",
                          "lm_head", "greedy_head", "penalty_sample_head", "vit"}
    assert (out / "token_config" / "config.json").is_file()
    mtimes = {n: f.stat().st_mtime_ns for n, f in files.items()}

    with open(files["block_chunk8_1"], "ab") as f:  # corrupt one finished piece
        f.write(b"garbage")
    stale_tmp = out / "pieces" / ".tmp-lm_head"  # and leave a half-written export behind
    stale_tmp.mkdir()
    (stale_tmp / "lm_head.onnx").write_bytes(b"half")

    second = export_cli("-m", model_dir, "-s", "16", "-f", out, "--prefill_lengths", "8,4")
    assert second.returncode == 0, second.stderr
    after = json.loads((out / "manifest.json").read_text())
    for name, f in files.items():
        if name == "block_chunk8_1":
            assert f.stat().st_mtime_ns != mtimes[name]
        else:
            assert f.stat().st_mtime_ns == mtimes[name], f"{name} was re-exported"
    assert not stale_tmp.exists()
    entry = after["pieces"]["block_chunk8_1"]
    from mllama_tpu.export.onnx_io import sha256_file
    assert sha256_file(files["block_chunk8_1"]) == entry["sha256"] == manifest["pieces"]["block_chunk8_1"]["sha256"]


def test_retrained_weights_of_the_same_size_are_exported_again(tmp_path, model_dir):
    # A retrained checkpoint has the same tensor shapes, hence the same file size: the export
    # must still notice (a stale export once hid a real mismatch behind a green parity run).
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "onnx"
    assert export_cli("-m", model, "-s", "16", "-f", out).returncode == 0
    before = json.loads((out / "manifest.json").read_text())["pieces"]["lm_head"]["sha256"]

    weights = next(model.glob("*.safetensors"))
    size = weights.stat().st_size
    tensors = load_file(weights)
    tensors = {k: v * 1.5 for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size

    res = export_cli("-m", model, "-s", "16", "-f", out)
    assert res.returncode == 0, res.stderr
    after = json.loads((out / "manifest.json").read_text())["pieces"]["lm_head"]["sha256"]
    assert after != before
