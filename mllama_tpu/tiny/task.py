"""The toy visual question task's vocabulary: colours, shapes, questions and exact answers."""
from __future__ import annotations

from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
SIDES: tuple[str, ...] = ("left", "right")
# Tile layouts as (rows, cols): the 8 arrangements of at most 4 tiles.
LAYOUTS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclass(frozen=True)
class Question:
    key: str  # which attribute of the scene answers it
    text: str
    answer_template: str  # formatted with value=
    values: tuple[str, ...]

    def answer(self, value: str) -> str:
        return self.answer_template.format(value=value)


QUESTIONS: tuple[Question, ...] = (
    Question("colour", "What color is the shape?", "The shape is {value}.", tuple(COLOURS)),
    Question("shape", "What shape is it?", "It is a {value}.", SHAPES),
    Question("side", "Is the shape on the left or the right?", "It is on the {value}.", SIDES),
    Question("background", "What color is the background?", "The background is {value}.", tuple(COLOURS)),
)
