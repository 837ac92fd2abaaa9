"""mllama_tpu.inputs: the engine inputs match what transformers builds from the same processor output."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

from mllama_tpu.inputs import (
    MASK_HIDDEN,
    MASK_VISIBLE,
    PromptTooLong,
    assistant_message,
    decode_self_mask,
    image_inputs_from,
    load_processor,
    pad_token_id,
    prefill_inputs,
    prepare_image,
    process,
    prompt_features,
    user_message,
)
from mllama_tpu.tiny import data
from mllama_tpu.tiny.config import TILE_SIZE
from mllama_tpu.tiny.task import LAYOUTS

SEQ = 64


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def dims(tiny_model_dir):
    from transformers import AutoConfig

    vc = AutoConfig.from_pretrained(tiny_model_dir).vision_config
    return {"num_patches": (vc.image_size // vc.patch_size) ** 2 + 1, "max_tiles": vc.max_num_tiles}


def image_of(layout: tuple[int, int], seed: int = 0):
    """A toy-task image of exactly rows x cols tiles, so the processor picks that tile layout."""
    rows, cols = layout
    return data.render(data.make_scene(random.Random(seed), layout)).resize((cols * TILE_SIZE, rows * TILE_SIZE))


def conversations() -> dict[str, list[dict]]:
    """Prompts with the image token at different places, and several turns."""
    img_first = [user_message("What shape is it?", True)]
    img_after_text = [
        {"role": "user", "content": [{"type": "text", "text": "What color is the shape?"}, {"type": "image"}]}
    ]
    img_second_turn = [
        user_message("Hello", False),
        assistant_message("Hello"),
        user_message("What color is the background?", True),
    ]
    two_turns = [
        user_message("What shape is it?", True),
        assistant_message("It is a circle."),
        user_message("Is the shape on the left or the right?", False),
    ]
    return {"first": img_first, "after_text": img_after_text, "second_turn": img_second_turn, "two_turns": two_turns}


def transformers_masks(cam: np.ndarray, num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """What MllamaForConditionalGeneration computes from the processor's cross_attention_mask."""
    mask, rows = _prepare_cross_attention_mask(torch.from_numpy(cam), num_vision_tokens=num_patches, dtype=torch.float32)
    return mask.numpy(), rows.numpy()


def assert_same_visibility(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Ours is 0 / -10000, transformers' 0 / finfo.min: the same positions must be visible."""
    assert set(np.unique(ours)) <= {MASK_VISIBLE, MASK_HIDDEN}
    np.testing.assert_array_equal(ours == MASK_VISIBLE, theirs == 0)


def whole(p):
    """The whole prompt as one chunk of SEQ rows against an empty cache."""
    return p.chunk(0, p.num_tokens, SEQ)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("convo", sorted(conversations()))
def test_cross_masks_match_transformers(processor, dims, layout, convo):
    messages = conversations()[convo]
    f = process(processor, messages, image_of(layout, seed=hash(layout) % 100))
    ids, cam = f["input_ids"][0], f["cross_attention_mask"]
    n = len(ids)
    p = prefill_inputs(ids, SEQ, pad_token_id(processor), cam, dims["num_patches"], dims["max_tiles"])
    c = whole(p)
    theirs_mask, theirs_rows = transformers_masks(cam, dims["num_patches"])

    T, P = dims["max_tiles"], dims["num_patches"]
    assert c.cross_attention_mask.shape == (1, 1, SEQ, T * P)
    assert c.cross_attention_mask.dtype == np.float32
    assert c.text_row_mask.shape == (1, SEQ, 1)
    assert_same_visibility(c.cross_attention_mask[0, 0, :n], theirs_mask[0, 0])
    np.testing.assert_array_equal(c.text_row_mask[0, :n, 0], theirs_rows[0, 0, :, 0])
    # Pad rows are out of the picture: zeroed like rows before the image.
    assert (c.text_row_mask[0, n:] == 0).all()
    # Any chunk's rows are the same rows.
    for part in p.chunks(0, (16, 64)):
        lo, hi = part.offset, part.offset + part.rows
        np.testing.assert_array_equal(part.cross_attention_mask[0, 0, :part.rows], c.cross_attention_mask[0, 0, lo:hi])
        np.testing.assert_array_equal(part.text_row_mask[0, :part.rows], c.text_row_mask[0, lo:hi])

    # Tiles beyond the image's real tiles are hidden in every row that sees the image.
    real = int(f["aspect_ratio_mask"].sum())
    assert real == layout[0] * layout[1]
    seeing = c.text_row_mask[0, :, 0] == 1
    assert seeing.any()
    assert (c.cross_attention_mask[0, 0, seeing, real * P :] == MASK_HIDDEN).all()
    assert (c.cross_attention_mask[0, 0, seeing, : real * P] == MASK_VISIBLE).all()

    # Decode: generate() appends a copy of the last row for every new token.
    ext = np.concatenate([cam, cam[:, -1:]], axis=1)
    ext_mask, ext_rows = transformers_masks(ext, P)
    assert_same_visibility(p.decode_cross_attention_mask[0, 0, 0], ext_mask[0, 0, -1])
    assert p.decode_text_row_mask.reshape(()) == ext_rows[0, 0, -1, 0]


def test_image_token_position_drives_the_mask(processor, dims):
    """Rows before the image token see nothing; the image token and everything after see it."""
    f = process(processor, conversations()["second_turn"], image_of((2, 2)))
    ids = f["input_ids"][0]
    at = int(np.flatnonzero(ids == processor.image_token_id)[0])
    assert at > 10  # really in the second user turn
    p = prefill_inputs(ids, SEQ, pad_token_id(processor), f["cross_attention_mask"], dims["num_patches"], dims["max_tiles"])
    rows = whole(p).text_row_mask[0, :, 0]
    assert (rows[:at] == 0).all() and (rows[at : len(ids)] == 1).all()


def test_text_only_prompt_has_no_image_inputs(processor):
    f = process(processor, [user_message("Hello", False)], None)
    assert "pixel_values" not in f and "cross_attention_mask" not in f
    p = prefill_inputs(f["input_ids"][0], SEQ, pad_token_id(processor), f.get("cross_attention_mask"))
    assert not p.has_image
    assert p.tile_rows is None and p.decode_cross_attention_mask is None
    assert whole(p).cross_attention_mask is None and whole(p).text_row_mask is None


def test_ids_positions_and_causal_mask(processor):
    f = process(processor, [user_message("What shape is it?", False)], None)
    ids = f["input_ids"][0]
    n = len(ids)
    p = prefill_inputs(ids, SEQ, pad_token_id(processor))
    assert p.token_ids == ids.tolist() and p.num_tokens == n
    c = whole(p)
    assert c.input_ids.dtype == np.int32 and c.input_ids.shape == (1, SEQ)
    assert (c.input_ids[0, n:] == processor.tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(c.position_ids[0, :n], np.arange(n))
    assert (c.position_ids[0, n:] == n - 1).all()  # pad rows repeat the last position
    m = c.attention_mask[0, 0]
    assert (m[:, :SEQ] == MASK_HIDDEN).all()  # an empty cache
    m = m[:, SEQ:]
    for i in range(n):  # real rows: exactly the real tokens up to themselves
        np.testing.assert_array_equal(m[i] == 0, (np.arange(SEQ) <= i))
    assert (m[n:, :n] == 0).all() and (m[:, n:] == MASK_HIDDEN).all()
    # The first token's own KV is visible to it: the chat template starts with BOS.
    assert ids[0] == processor.tokenizer.bos_token_id


def test_decode_self_mask():
    m = decode_self_mask(5, 8)
    assert m.shape == (1, 1, 1, 9)
    np.testing.assert_array_equal(m[0, 0, 0] == 0, [1, 1, 1, 1, 1, 0, 0, 0, 1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_inputs_shapes(processor, dims, layout):
    f = process(processor, [user_message("What shape is it?", True)], image_of(layout))
    im = image_inputs_from(f)
    T = dims["max_tiles"]
    assert im.pixel_values.shape[:2] == (T, 3) and im.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(im.pixel_values, f["pixel_values"][0, 0])
    assert im.aspect_ratio_ids.shape == (1, 1) and im.aspect_ratio_ids.dtype == np.int32
    assert im.aspect_ratio_mask.shape == (1, T) and im.aspect_ratio_mask.dtype == np.int32
    assert im.num_tiles == layout[0] * layout[1]


def test_layouts_cover_every_aspect_ratio(processor):
    ids = {int(process(processor, [user_message("Hi", True)], image_of(l))["aspect_ratio_ids"][0, 0]) for l in LAYOUTS}
    assert ids == set(range(1, len(LAYOUTS) + 1))


def test_prompt_longer_than_seq_is_refused(processor):
    ids = list(range(10))
    with pytest.raises(PromptTooLong, match="10 tokens.*limit is 8"):
        prefill_inputs(ids, 8, 0)
    assert prefill_inputs(ids, 10, 0).num_tokens == 10


def test_processor_tiles_must_match_engine(processor, dims):
    f = process(processor, [user_message("Hi", True)], image_of((1, 1)))
    with pytest.raises(ValueError, match="tiles"):
        prefill_inputs(f["input_ids"][0], SEQ, 0, f["cross_attention_mask"], dims["num_patches"], dims["max_tiles"] + 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_runtime_path_equals_the_processor(processor, layout):
    """The session tiles an image once (prepare_image) and builds each prompt from the tiles
    (prompt_features): the same arrays as one processor call on image and text together."""
    convo = [user_message("What shape is it?", True), assistant_message("a circle"),
             user_message("And the colour?", False)]
    f = process(processor, convo, image_of(layout))
    tiles = prepare_image(processor, image_of(layout))
    g = prompt_features(processor, convo, tiles)
    np.testing.assert_array_equal(tiles.pixel_values, f["pixel_values"][0, 0])
    np.testing.assert_array_equal(tiles.aspect_ratio_ids.ravel(), f["aspect_ratio_ids"].ravel())
    np.testing.assert_array_equal(tiles.aspect_ratio_mask.ravel(), f["aspect_ratio_mask"].ravel())
    np.testing.assert_array_equal(g["input_ids"], f["input_ids"])
    np.testing.assert_array_equal(g["cross_attention_mask"], f["cross_attention_mask"])
    text_only = [user_message("Hi", False)]
    np.testing.assert_array_equal(prompt_features(processor, text_only, None)["input_ids"],
                                  process(processor, text_only, None)["input_ids"])
