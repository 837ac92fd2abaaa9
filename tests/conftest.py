"""Session fixtures: the chain's artifacts are made once per test run and shared.

Export and compile are resumable (a piece whose inputs did not change is kept), so the cache
under build/test-cache also survives between runs on one machine; a fresh clone builds it anew.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.dir_lock import exclusive

TINY_MODEL = REPO_ROOT / "assets" / "tiny-mllama"
CACHE = REPO_ROOT / "build" / "test-cache"
TEST_SEQ_LENGTH = 128
# Shorter than the defaults cut to SEQ (32, 128): conversations of the tests outgrow the largest
# chunk, so prompts run as several chunks and follow-ups reuse the cache across them.
TEST_PREFILL_LENGTHS = (16, 64)


# run_tests.sh runs the files on two workers (pytest-xdist, a file at a time, in this order):
# the longest start first so that both workers finish together (docs/testing.md has the times).
LONGEST_FIRST = ("test_sanitizers.py", "test_int4_accuracy.py", "test_compile.py", "test_export_full_dims.py",
                 "test_real_vocab.py", "test_engine_bmodel.py", "test_cmodel_yield.py", "test_pipeline.py",
                 "test_demo.py", "test_server_load.py", "test_server_api.py", "test_soak.py",
                 "test_server_errors.py", "test_compile_cli.py", "test_faults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def test_seq_length() -> int:
    return TEST_SEQ_LENGTH


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir: Path) -> Path:
    from mllama_tpu.export import export_model

    out = CACHE / "onnx-tiny"
    export_model(tiny_model_dir, out, TEST_SEQ_LENGTH, prefill_lengths=TEST_PREFILL_LENGTHS)
    return out


def _bmodel_factory(onnx_dir: Path, name: str, cache_prefix: str):
    """get(mode, lm_head=None) -> the export compiled in that mode, once per run (cached across runs)."""
    from mllama_tpu.compile import compile_model

    made: dict[tuple[str, str | None], Path] = {}

    def get(mode: str, lm_head: str | None = None) -> Path:
        if (mode, lm_head) not in made:
            out = CACHE / (f"{cache_prefix}-{mode}-{lm_head}-lm" if lm_head else f"{cache_prefix}-{mode}")
            made[mode, lm_head] = compile_model(onnx_dir, mode, name, TEST_SEQ_LENGTH, out, lm_head=lm_head)
        return made[mode, lm_head]

    return get


@pytest.fixture(scope="session")
def tiny_bmodel(tiny_onnx_dir: Path):
    """Factory: tiny_bmodel("f32") -> path of the tiny model compiled in that mode;
    tiny_bmodel("int4", lm_head="float") with compile's --lm_head float."""
    return _bmodel_factory(tiny_onnx_dir, "tiny", "bmodel")


@pytest.fixture(scope="session")
def processor(tiny_onnx_dir: Path):
    """The exported token_config's processor (what every engine test prompts with)."""
    from mllama_tpu.inputs import load_processor

    return load_processor(tiny_onnx_dir / "token_config")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    """transformers' model on the tiny weights: the truth."""
    import torch
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_vocab_model_dir() -> Path:
    """The random tiny Mllama with Llama 3.2's tokenizer (mllama_tpu.real_vocab), rebuilt when the
    code that writes it changes (its files are stamped with their checksums)."""
    import hashlib
    import shutil

    from mllama_tpu import real_vocab
    from mllama_tpu.export import random_checkpoint
    from mllama_tpu.tiny import build, tokenizer

    out = CACHE / "real-vocab-model"
    sources = [Path(m.__file__) for m in (real_vocab, random_checkpoint, build, tokenizer)]
    sources.append(real_vocab.published_tokenizer_file())
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    with exclusive(CACHE, "real-vocab-model"):  # test workers share the cache
        if (out / "stamp").is_file() and (out / "stamp").read_text() == stamp:
            return out
        shutil.rmtree(out, ignore_errors=True)
        real_vocab.write_model(out)
        (out / "stamp").write_text(stamp)
    return out


@pytest.fixture(scope="session")
def real_vocab_onnx_dir(real_vocab_model_dir: Path) -> Path:
    from mllama_tpu.export import export_model

    out = CACHE / "onnx-real-vocab"
    export_model(real_vocab_model_dir, out, TEST_SEQ_LENGTH)
    return out


@pytest.fixture(scope="session")
def real_vocab_bmodel(real_vocab_onnx_dir: Path):
    """Factory: real_vocab_bmodel("f32" | "int4") -> the real-vocabulary model compiled in that mode."""
    return _bmodel_factory(real_vocab_onnx_dir, "realvocab", "bmodel-real-vocab")
