"""Fuzzing manifest.json and the token facts beside a model (mllama_tpu.manifest): the tiny
export's manifest with one field replaced by any JSON value or removed, arbitrary bytes, damaged
config.json / generation_config.json. What passes read_manifest opens in its readers (the ONNX
engine, compile's view of the export); everything else is one line naming the manifest.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import JSON, assert_clear, bounded, mutated
from mllama_tpu.compile.pieces import load_export
from mllama_tpu.engines.onnx import OnnxEngine
from mllama_tpu.errors import UserError
from mllama_tpu.manifest import MANIFEST_NAME, read_manifest, token_facts

@pytest.fixture(scope="module")
def export_files(tiny_onnx_dir) -> tuple[Path, dict]:
    return tiny_onnx_dir, json.loads((tiny_onnx_dir / MANIFEST_NAME).read_text())


def export_with(tmp: Path, source: Path, manifest_bytes: bytes) -> Path:
    """An export dir whose ONNX files are the tiny export's (links) and whose manifest is given."""
    out = tmp / "export"
    if not out.is_dir():
        out.mkdir()
        for p in source.iterdir():
            if p.name != MANIFEST_NAME:
                (out / p.name).symlink_to(p)
    (out / MANIFEST_NAME).write_bytes(manifest_bytes)
    return out


def opens_or_refuses(export: Path, seq_length: int) -> None:
    where = str(export / MANIFEST_NAME)
    for reader in (read_manifest, lambda d: load_export(d, seq_length, verify=False), OnnxEngine):
        try:
            reader(export)
        except UserError as e:
            assert_clear(e, str(export))
            assert where in str(e) or "export" in str(e)


def test_the_unmutated_manifest_opens(export_files, tmp_path):
    source, manifest = export_files
    export = export_with(tmp_path, source, json.dumps(manifest).encode())
    assert read_manifest(export)["seq_length"] == manifest["seq_length"]
    OnnxEngine(export).close()


@bounded(250)
@given(data=st.data())
def test_mutated_manifest_opens_or_is_refused_in_one_line(export_files, tmp_path, data):
    source, manifest = export_files
    doc = data.draw(mutated(manifest))
    opens_or_refuses(export_with(tmp_path, source, json.dumps(doc).encode()), manifest["seq_length"])


@bounded(60)
@given(data=st.data())
def test_damaged_manifest_bytes(export_files, tmp_path, data):
    source, manifest = export_files
    text = json.dumps(manifest).encode()
    raw = data.draw(st.one_of(st.binary(max_size=100),
                              st.integers(0, len(text) - 1).map(lambda n: text[:n]),
                              st.tuples(st.integers(0, len(text) - 1), st.integers(0, 255))
                              .map(lambda f: text[:f[0]] + bytes([f[1]]) + text[f[0] + 1:])))
    opens_or_refuses(export_with(tmp_path, source, raw), manifest["seq_length"])


@bounded(200)
@given(data=st.data())
def test_token_facts_of_damaged_files(export_files, tmp_path, data):
    """EOS and image token ids come from three files beside a model: any of them damaged gives
    ids or one line naming the file, never a KeyError / TypeError deep in the session."""
    source, manifest = export_files
    model = tmp_path / "model"
    tc = model / "token_config"
    if not tc.is_dir():
        shutil.copytree(source / "token_config", tc)
        (model / MANIFEST_NAME).write_text(json.dumps(manifest))
    originals = {MANIFEST_NAME: manifest}
    for name in ("config.json", "generation_config.json"):
        originals[name] = json.loads((source / "token_config" / name).read_text())
    target = data.draw(st.sampled_from(sorted(originals)))
    doc = data.draw(st.one_of(mutated(originals[target]), JSON))
    path = model / target if target == MANIFEST_NAME else tc / target
    path.write_text(json.dumps(doc))
    try:
        facts = token_facts(model, tc)
    except UserError as e:
        assert_clear(e, path.name)
    else:
        assert all(type(i) is int for i in facts.eos_ids)
        assert facts.image_token_id is None or type(facts.image_token_id) is int
    finally:
        path.write_text(json.dumps(originals[target]))
