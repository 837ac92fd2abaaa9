"""Session fixtures: the chain's artifacts are made once per test run and shared.

Export and compile are resumable (a piece whose inputs did not change is kept), so the cache
under build/test-cache also survives between runs on one machine; a fresh clone builds it anew.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mllama_tpu import REPO_ROOT

TINY_MODEL = REPO_ROOT / "assets" / "tiny-mllama"
CACHE = REPO_ROOT / "build" / "test-cache"
TEST_SEQ_LENGTH = 128


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
    export_model(tiny_model_dir, out, TEST_SEQ_LENGTH)
    return out


@pytest.fixture(scope="session")
def tiny_bmodel(tiny_onnx_dir: Path):
    """Factory: tiny_bmodel("f32") -> path of the tiny model compiled in that mode (once per run);
    tiny_bmodel("int4", lm_head_w8=True) with compile's --lm_head_w8."""
    from mllama_tpu.compile import compile_model

    made: dict[tuple[str, bool], Path] = {}

    def get(mode: str, lm_head_w8: bool = False) -> Path:
        if (mode, lm_head_w8) not in made:
            out = CACHE / (f"bmodel-{mode}-w8lm" if lm_head_w8 else f"bmodel-{mode}")
            made[mode, lm_head_w8] = compile_model(tiny_onnx_dir, mode, "tiny", TEST_SEQ_LENGTH, out,
                                                   lm_head_w8=lm_head_w8)
        return made[mode, lm_head_w8]

    return get


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
