"""Fuzzing the bmodel file the C++ engine opens: truncated copies, flipped bits in the header and
the flatbuffer, arbitrary bytes, a damaged stamp. Each is refused in one line before libbmrt
sees it (mllama_tpu.bmodel_file): libbmrt itself threw std::bad_alloc or aborted the process
from an assert on some flips (the two kept below, found by a first run in a subprocess).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import assert_clear, bounded, floats
from mllama_tpu import REPO_ROOT, bmodel_file
from mllama_tpu.compile.cache import stamp_path
from mllama_tpu.engines import open_engine
from mllama_tpu.errors import UserError

# (offset, bit) of flips in the tiny f32 bmodel's flatbuffer that libbmrt loaded and then died on
# (seen in a subprocess before the check existed): std::bad_alloc from bmrt_load_bmodel, and
# "ASSERT info: cannot get valid mem by dst_addr" (exit 255) on the first prefill.
CRASHED_LIBBMRT = [(202, 7), (17518, 3)]


@pytest.fixture(scope="module")
def bmodel(tiny_bmodel) -> Path:
    return tiny_bmodel("f32")


@pytest.fixture(scope="module")
def head_length(bmodel) -> int:
    return bmodel_file.head_length(bmodel)


@pytest.fixture()
def copy(bmodel, tmp_path) -> Path:
    """A copy of the bmodel with its stamp (what compile leaves in its output dir)."""
    out = tmp_path / bmodel.name
    shutil.copyfile(bmodel, out)
    shutil.copyfile(stamp_path(bmodel), stamp_path(out))
    return out


def refused(path: Path, *words: str) -> str:
    with pytest.raises(UserError) as e:
        open_engine("bmodel", path).close()
    message = assert_clear(e.value, str(path))
    assert any(w in message for w in words), message
    return message


def test_compile_records_the_head_digest(bmodel):
    stamp = json.loads(stamp_path(bmodel).read_text())
    assert stamp[bmodel_file.DIGEST_KEY] == bmodel_file.head_sha256(bmodel)


@bounded(25, deadline_ms=20000)
@given(cut=floats(0, 1, exclude_max=True))
@example(cut=0.0)
@example(cut=0.5)
def test_truncated_bmodel_is_refused(bmodel, tmp_path, cut):
    data = bmodel.read_bytes()
    path = tmp_path / "cut.bmodel"
    path.write_bytes(data[: int(len(data) * cut)])  # no stamp: the header alone tells
    refused(path, "not a complete bmodel")


@bounded(60, deadline_ms=20000)
@given(where=floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_bit_in_header_or_flatbuffer_is_refused(copy, head_length, where, bit):
    offset = int(head_length * where)
    with open(copy, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    refused(copy, "damaged bmodel", "not a bmodel", "not a complete bmodel")


@bounded(60)
@given(data=st.one_of(st.binary(max_size=200),
                      st.builds(lambda sizes, tail: struct.pack("<IIIQ", bmodel_file.MAGIC, *sizes) + tail,
                                st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                          st.integers(0, 2**64 - 1)), st.binary(max_size=100))))
def test_arbitrary_bytes_are_not_a_bmodel(tmp_path, data):
    path = tmp_path / "x.bmodel"
    path.write_bytes(data)
    refused(path, "not a bmodel", "not a complete bmodel")


@bounded(40)
@given(stamp=st.one_of(st.binary(max_size=60),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                    lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=5), x, max_size=3),
                                    max_leaves=6).map(lambda v: json.dumps(v).encode()),
                       st.text(max_size=64).map(lambda d: json.dumps({bmodel_file.DIGEST_KEY: d}).encode())))
def test_damaged_stamp_never_breaks_the_check(copy, stamp):
    stamp_path(copy).write_bytes(stamp)
    try:
        bmodel_file.check_bmodel(copy)
    except UserError as e:
        assert "damaged bmodel" in assert_clear(e, str(copy))


def flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset,bit", CRASHED_LIBBMRT)
def test_flips_that_crashed_libbmrt_are_refused(copy, offset, bit):
    flip(copy, offset, bit)
    refused(copy, "damaged bmodel")


def test_damaged_bmodel_is_one_line_from_the_cli(bmodel, copy):
    flip(copy, *CRASHED_LIBBMRT[1])
    r = subprocess.run([sys.executable, str(REPO_ROOT / "python_demo" / "pipeline.py"), "-m", str(copy),
                        "-t", str(bmodel.parent / "token_config"), "--backend", "bmodel"], input="", capture_output=True, text=True, timeout=300,
                       cwd=REPO_ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "damaged bmodel" in errors[0] and str(copy) in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
