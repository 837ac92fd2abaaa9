"""The prompts every engine is checked on against transformers, and the two ways to run them.

Shared by the ONNX reference engine's and the bmodel engine's parity tests, so both engines are
held to the same cases built the same way (each file picks its own seed).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from mllama_tpu.generate import Generation, generate
from mllama_tpu.inputs import pad_token_id, prefill_inputs, prepare_image, prompt_features, user_message
from mllama_tpu.tiny import data
from mllama_tpu.tiny.config import TILE_SIZE
from mllama_tpu.tiny.task import LAYOUTS


@dataclasses.dataclass
class Case:
    name: str
    messages: list[dict]
    scene: data.Scene | None
    expected: str | None  # the toy task's answer to the last question
    picture: Any = None  # an image given as is, for models that are not the toy task's

    @property
    def image(self):
        if self.picture is not None:
            return self.picture
        return data.render(self.scene) if self.scene is not None else None


def at_tile_size(scene: data.Scene) -> data.Scene:
    """The same picture scaled to exactly rows x cols tiles, so the processor uses that layout."""
    rows, cols = scene.layout
    k = cols * TILE_SIZE / scene.width
    return dataclasses.replace(scene, width=cols * TILE_SIZE, height=rows * TILE_SIZE,
                               centre=(scene.centre[0] * k, scene.centre[1] * k), size=scene.size * k)


def make_cases(seed: int, two_turn: int, text_prompt: str) -> list[Case]:
    """Every tile layout exactly, two free sizes, `two_turn` two-turn conversations, one text-only."""
    rng = random.Random(seed)
    cases = []
    for layout in LAYOUTS:
        s = data.make_sample(rng, layout, turns=1)
        s = dataclasses.replace(s, scene=at_tile_size(s.scene))
        cases.append(Case(f"layout{layout[0]}x{layout[1]}", data.messages_for(s, with_last_answer=False),
                          s.scene, s.turns[0].answer))
    for i in range(2):  # free sizes: the processor chooses the layout and resizes
        s = data.make_sample(rng, turns=1)
        cases.append(Case(f"free{i}", data.messages_for(s, with_last_answer=False), s.scene, s.turns[0].answer))
    for i in range(two_turn):  # the first answer is history in the second prompt
        s = data.make_sample(rng, turns=2)
        cases.append(Case(f"two_turns{i}", data.messages_for(s, upto=2, with_last_answer=False),
                          s.scene, s.turns[1].answer))
    cases.append(Case("text_only", [user_message(text_prompt, False)], None, None))
    return cases


def hf_generate(model, processor, case: Case, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate on the processor's output: the truth."""
    text = processor.apply_chat_template(case.messages, add_generation_prompt=True)
    image = case.image
    images = [image] if image is not None else None
    f = processor(images=images, text=text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**f, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, f["input_ids"].shape[1]:].tolist()


def engine_generate(engine, processor, case: Case, max_new_tokens: int, eos: list[int]) -> Generation:
    """The same case through the runtime's own input path (the image processor once, then the
    prompt) and mllama_tpu.generate on any Engine."""
    image = prepare_image(processor, case.image) if case.image is not None else None
    if image is not None:
        engine.encode_image(image)
    f = prompt_features(processor, case.messages, image)
    p = prefill_inputs(f["input_ids"][0], engine.seq_length, pad_token_id(processor),
                       f.get("cross_attention_mask"), engine.num_patches, engine.max_tiles)
    return generate(engine, p, eos, max_new_tokens)


@dataclasses.dataclass
class Conversation:
    """Turns sent one after another to one engine, each prompt the whole conversation so far:
    the engine's cache reuse decides what runs again. `turns` are (messages, image) per turn."""

    name: str
    turns: list[tuple[list[dict], Any]]


def conversations(seed: int) -> list[Conversation]:
    """Four turns about one image (history through the cache), the same conversation about
    another image (nothing may be reused, and the whole prompt is longer than the test export's
    largest chunk), and text-only turns."""
    from mllama_tpu.inputs import assistant_message

    rng = random.Random(seed)
    s = data.make_sample(rng, turns=4)
    other = data.make_sample(rng, turns=1)
    first = [data.messages_for(s, upto=k, with_last_answer=False) for k in (1, 2, 3, 4)]
    text = [[user_message("Hello", False)]]
    text.append(text[0] + [assistant_message("Hi.")] + [user_message("What colour is the sky?", False)])
    return [
        Conversation("four_turns", [(m, data.render(s.scene)) for m in first]),
        Conversation("image_changes", [(first[1], data.render(s.scene)), (first[3], data.render(other.scene))]),
        Conversation("text_turns", [(m, None) for m in text]),
    ]


def conversation_case(conversation: Conversation, turn: int) -> Case:
    messages, image = conversation.turns[turn]
    return Case(f"{conversation.name}{turn}", messages, None, None, picture=image)


def run_conversation(engine, processor, hf_model, conversation: Conversation, max_new_tokens: int) -> list[int]:
    """Every turn's answer equals transformers' on the whole conversation; returns how many prompt
    tokens each turn found in the cache (the engine encodes an image only when it changes)."""
    eos = list(hf_model.generation_config.eos_token_id)
    reused, last_image = [], None
    for k in range(len(conversation.turns)):
        case = conversation_case(conversation, k)
        want = hf_generate(hf_model, processor, case, max_new_tokens)
        image = prepare_image(processor, case.image) if case.image is not None else None
        if image is not None and (last_image is None or not (image.pixel_values == last_image.pixel_values).all()):
            engine.encode_image(image)
            last_image = image
        f = prompt_features(processor, case.messages, image)
        p = prefill_inputs(f["input_ids"][0], engine.seq_length, pad_token_id(processor),
                           f.get("cross_attention_mask"), engine.num_patches, engine.max_tiles)
        got = generate(engine, p, eos, max_new_tokens)
        tokens = got.tokens + ([want[-1]] if want and want[-1] in eos and got.stop_reason == "eos" else [])
        assert tokens == want, f"{case.name}: engine {tokens} != transformers {want}"
        reused.append(engine.last_reused)
    return reused
