"""Fuzzing token_config/ (mllama_tpu.token_config): the tiny export's tokenizer, processor and
chat template with one JSON field replaced or removed, a file truncated, bytes flipped, the chat
template's text damaged. Opening it, checking it against the engine and building a first
prompt (with an image) either works or is one line naming the token_config; a damaged template
is found at open, not at the user's first question.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuzzing import JSON, assert_clear, bounded, floats, mutated
from mllama_tpu.engines.onnx import OnnxEngine
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import prepare_image, prompt_features, user_message
from mllama_tpu.session import LoadedModel
from mllama_tpu.token_config import open_processor

JSON_FILES = ["tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
              "generation_config.json", "config.json"]
TEXT_FILES = ["chat_template.jinja", "tokenizer.json", *JSON_FILES]


@pytest.fixture(scope="module")
def engine(tiny_onnx_dir):
    e = OnnxEngine(tiny_onnx_dir)  # no net runs here: only its dims are asked
    yield e
    e.close()


@pytest.fixture(scope="module")
def originals(tiny_onnx_dir) -> dict[str, bytes]:
    return {name: (tiny_onnx_dir / "token_config" / name).read_bytes() for name in TEXT_FILES}


@pytest.fixture()
def token_config(tiny_onnx_dir, tmp_path) -> Path:
    out = tmp_path / "token_config"
    shutil.copytree(tiny_onnx_dir / "token_config", out)
    return out


def opens_and_prompts_or_refuses(engine, tc: Path) -> None:
    try:
        processor = open_processor(tc)
        model = LoadedModel.on(engine, processor, tc)
        tiles = prepare_image(processor, Image.new("RGB", (40, 30), (200, 10, 10)))
        ids = prompt_features(model.processor, [user_message("What shape is it?", True)], tiles)["input_ids"]
        assert ids.shape[1] > 0
    except UserError as e:
        assert_clear(e, str(tc))


def test_the_exported_token_config_opens(engine, token_config):
    opens_and_prompts_or_refuses(engine, token_config)
    assert open_processor(token_config).image_token_id is not None


@bounded(60, deadline_ms=20000)
@given(data=st.data())
def test_mutated_json_file(engine, originals, token_config, data):
    name = data.draw(st.sampled_from(JSON_FILES))
    doc = data.draw(st.one_of(mutated(json.loads(originals[name])), JSON))
    (token_config / name).write_text(json.dumps(doc))
    try:
        opens_and_prompts_or_refuses(engine, token_config)
    finally:
        (token_config / name).write_bytes(originals[name])


@bounded(60, deadline_ms=20000)
@given(data=st.data())
def test_truncated_or_flipped_file(engine, originals, token_config, data):
    name = data.draw(st.sampled_from(TEXT_FILES))
    raw = originals[name]
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, cut - 1)), st.integers(0, 7)), max_size=3))
    damaged = bytearray(raw[:cut])
    for offset, bit in flips:
        if damaged:
            damaged[offset] ^= 1 << bit
    (token_config / name).write_bytes(bytes(damaged))
    try:
        opens_and_prompts_or_refuses(engine, token_config)
    finally:
        (token_config / name).write_bytes(raw)


@bounded(25, deadline_ms=20000)
@given(junk=st.sampled_from(["{{", "{% if %}", "{{ raise_exception('x') }}", "{{ messages[99] }}",
                             "{% for %}", "{{ undefined_thing.attr }}", "{% endfor %}", "\0", ""]),
       where=floats(0, 1))
def test_damaged_chat_template(engine, originals, token_config, junk, where):
    text = originals["chat_template.jinja"].decode()
    at = int(len(text) * where)
    (token_config / "chat_template.jinja").write_text(text[:at] + junk + text[at:])
    try:
        opens_and_prompts_or_refuses(engine, token_config)
    finally:
        (token_config / "chat_template.jinja").write_bytes(originals["chat_template.jinja"])
