"""Prefill in chunks against the KV cache, and what a new prompt may keep of it.

The rules (engines.cache.CachedTokens, inputs.PrefillInputs.chunks / chunk_self_mask) are held
to their definitions here; that an engine using them answers as transformers does, turn after
turn, is in test_onnx_engine.py and test_engine_bmodel.py (run_conversation).
"""
from __future__ import annotations

import numpy as np
import pytest

from mllama_tpu.contract import MASK_HIDDEN, MASK_VISIBLE, prefill_lengths
from mllama_tpu.engines.cache import CachedTokens
from mllama_tpu.engines.onnx import OnnxEngine
from mllama_tpu.inputs import chunk_self_mask, decode_self_mask, prefill_inputs
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.session import ChatSession, LoadedModel, Notice, TurnDone

SEQ = 128


def rows(ids, tiles=None):
    return prefill_inputs(np.asarray(ids), SEQ, 0, tiles, 3 if tiles is not None else None,
                          tiles.shape[-1] if tiles is not None else None).row_keys


def cached(ids, image=None) -> CachedTokens:
    c = CachedTokens()
    c.filled(rows(ids), image)
    return c


# --- what a prompt may keep --------------------------------------------------------------------

def test_exact_repeat_runs_the_last_token_again():
    ids = list(range(10, 30))
    assert cached(ids).reusable(rows(ids), None) == len(ids) - 1


def test_extension_keeps_everything_cached():
    ids = list(range(10, 30))
    assert cached(ids).reusable(rows(ids + [5, 6, 7]), None) == len(ids)


def test_divergence_mid_prompt_keeps_the_common_prefix():
    ids = list(range(10, 30))
    changed = ids[:7] + [99] + ids[8:]
    assert cached(ids).reusable(rows(changed), None) == 7
    assert cached(ids).reusable(rows([1] + ids[1:]), None) == 0


def test_another_image_keeps_nothing():
    ids = list(range(10, 30))
    assert cached(ids, image=1).reusable(rows(ids), 2) == 0
    assert cached(ids, image=1).reusable(rows(ids), None) == 0  # text-only after an image prompt
    assert cached(ids, image=None).reusable(rows(ids), 1) == 0  # an image prompt after text-only
    assert cached(ids, image=1).reusable(rows(ids + [3]), 1) == len(ids)


def test_tiles_seen_are_part_of_a_token():
    """Same ids, but a token that sees other tiles (another tile count) was computed differently."""
    ids = list(range(10, 20))
    one, two = np.zeros((1, 10, 1, 4)), np.zeros((1, 10, 1, 4))
    one[0, 3:, 0, :1] = 1
    two[0, 3:, 0, :2] = 1
    c = CachedTokens()
    c.filled(rows(ids, one), 1)
    assert c.reusable(rows(ids, two), 1) == 3
    assert c.reusable(rows(ids, one), 1) == 9


def test_a_failed_step_forgets_the_cache():
    c = cached(list(range(10, 30)))
    c.forget()
    assert len(c) == 0 and c.reusable(rows(list(range(10, 30))), None) == 0


# --- chunks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,length,want", [
    (0, 5, [(0, 5, 16)]), (0, 16, [(0, 16, 16)]), (0, 17, [(0, 17, 64)]), (0, 64, [(0, 64, 64)]),
    (0, 100, [(0, 64, 64), (64, 36, 64)]), (60, 70, [(60, 10, 16)]), (0, 128, [(0, 64, 64), (64, 64, 64)]),
])
def test_chunks_take_the_largest_then_the_shortest_that_holds_the_rest(start, length, want):
    p = prefill_inputs(np.arange(length) + 10, SEQ, 0)
    assert [(c.offset, c.rows, c.size) for c in p.chunks(start, (16, 64))] == want


def test_prefill_lengths_are_cut_to_seq_and_refuse_one():
    assert prefill_lengths(None, 128) == (64, 128)
    assert prefill_lengths(None, 4096) == (64, 128, 512)
    assert prefill_lengths([64, 16, 64], 128) == (16, 64)
    with pytest.raises(ValueError, match="at least 2"):
        prefill_lengths([1, 16], 128)


def test_chunk_mask_is_causal_over_cache_and_chunk():
    filled, rows_, size = 5, 3, 4
    m = chunk_self_mask(filled, rows_, size, SEQ)[0, 0]
    assert m.shape == (size, SEQ + size)
    for r in range(size):
        for col in range(SEQ + size):
            own = col - SEQ
            visible = col < filled or (0 <= own <= min(r, rows_ - 1))
            assert m[r, col] == (MASK_VISIBLE if visible else MASK_HIDDEN), (r, col)
    # a decode step is the chunk of one
    assert np.array_equal(decode_self_mask(7, SEQ), chunk_self_mask(7, 1, 1, SEQ))


def test_pad_rows_stay_inside_the_rotary_table():
    p = prefill_inputs(np.arange(SEQ) + 10, SEQ, 0)
    last = p.chunks(SEQ - 3, (16, 64))[0]
    assert last.position_ids.max() == SEQ - 1 and last.position_ids.shape == (1, 16)


# --- a conversation that outgrows SEQ starts afresh, and the cache follows -----------------------

def test_restart_after_seq_reuses_only_what_still_matches(tiny_onnx_dir, tiny_model_dir):
    """ChatSession drops the history when the next turn would not fit; the engine then keeps only
    the restarted prompt's common prefix, and answers as a fresh engine does."""
    from mllama_tpu.inputs import user_message

    model = LoadedModel.open("onnx", tiny_onnx_dir)
    session = ChatSession(model, max_new_tokens=40, enable_history=True)
    questions = ["Hello there, how are you doing today?"] * 6
    notices, k = [], 0
    while not notices and k < len(questions):
        events = list(session.turn(questions[k]))
        notices = [e for e in events if isinstance(e, Notice)]
        k += 1
    assert notices, "the conversation never outgrew SEQ"
    done = next(e for e in events if isinstance(e, TurnDone))
    assert 0 < model.engine.last_reused < done.prompt_tokens  # only the restarted prompt's prefix

    fresh = OnnxEngine(tiny_onnx_dir)
    fresh.set_sampling(SamplingParams())
    p = model.prompt([user_message(questions[k - 1], False)], None)
    from mllama_tpu.generate import generate

    g = generate(fresh, p, model.eos_ids, 40)
    assert g.tokens == done.tokens
