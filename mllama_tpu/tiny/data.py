"""Synthetic images and conversations of the toy task, deterministic from a seed.

An image is one background colour with one filled shape of another colour. Its size follows a tile
layout (rows x cols) scaled by f in [0.5, 2], so every aspect ratio the model supports shows up and
the processor sometimes up-, sometimes downscales. The shape is 0.3-0.6 of the shorter side, fully
inside, centred in the left or right 40 % of the width (never ambiguous).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mllama_tpu.tiny.config import TILE_SIZE
from mllama_tpu.tiny.task import COLOURS, LAYOUTS, QUESTIONS, SHAPES, SIDES, Question


@dataclass(frozen=True)
class Scene:
    layout: tuple[int, int]  # (rows, cols) the size was drawn from
    width: int
    height: int
    background: str
    colour: str
    shape: str
    side: str
    centre: tuple[float, float]
    size: float  # side of the shape's bounding square, pixels

    def value(self, key: str) -> str:
        """The truth for a question's key ("colour", "shape", "side", "background")."""
        return {"colour": self.colour, "shape": self.shape, "side": self.side, "background": self.background}[key]


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    scene: Scene
    turns: tuple[Turn, ...]  # 1 or 2 turns about the same image; each turn a different question


def make_scene(rng: random.Random, layout: tuple[int, int] | None = None) -> Scene:
    rows, cols = layout if layout is not None else rng.choice(LAYOUTS)
    f = rng.uniform(0.5, 2.0)
    width, height = round(cols * TILE_SIZE * f), round(rows * TILE_SIZE * f)
    background, colour = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    side = rng.choice(SIDES)
    size = rng.uniform(0.3, 0.6) * min(width, height)
    half = size / 2
    # Centre within the chosen 40 % band and far enough from the edges to keep the shape inside
    # (half <= 0.3 * width, so the band always has room).
    if side == "left":
        cx = rng.uniform(half, 0.4 * width)
    else:
        cx = rng.uniform(0.6 * width, width - half)
    cy = rng.uniform(half, height - half)
    return Scene((rows, cols), width, height, background, colour, shape, side, (cx, cy), size)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = scene.centre
    h = scene.size / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # upright triangle: apex at the top centre, base along the bottom of the bounding square
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    return image


def make_turn(question: Question, scene: Scene) -> Turn:
    return Turn(question.text, question.answer(scene.value(question.key)))


def make_sample(
    rng: random.Random,
    layout: tuple[int, int] | None = None,
    turns: int | None = None,
    turn_choices: tuple[int, ...] = (1, 2),
) -> Sample:
    """turns fixed, or drawn from turn_choices (the trainer asks for up to all 4 questions about one
    image: more answers per vision pass; their prefixes are the 1- and 2-turn conversations)."""
    scene = make_scene(rng, layout)
    n = turns if turns is not None else rng.choice(turn_choices)
    questions = rng.sample(QUESTIONS, n)
    return Sample(scene, tuple(make_turn(q, scene) for q in questions))


def make_samples(seed: int, count: int, cycle_layouts: bool = False) -> list[Sample]:
    """`count` samples from `seed`; with cycle_layouts the layouts go round-robin so every one appears."""
    rng = random.Random(seed)
    return [
        make_sample(rng, LAYOUTS[i % len(LAYOUTS)] if cycle_layouts else None) for i in range(count)
    ]


def messages_for(sample: Sample, upto: int | None = None, with_last_answer: bool = True) -> list[dict]:
    """Chat messages (Meta's format) of the first `upto` turns; the image is in the first user turn.

    with_last_answer=False leaves the last turn's answer out: the prompt that asks for it.
    """
    turns = sample.turns[: upto if upto is not None else len(sample.turns)]
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        content: list[dict] = [{"type": "text", "text": turn.question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if with_last_answer or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return messages
