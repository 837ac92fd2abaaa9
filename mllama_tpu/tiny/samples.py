"""Writes a few sample images of the toy task, with their truth, for the demo and for people.

CLI: python -m mllama_tpu.tiny.samples --out assets/samples
Writes one PNG per chosen layout and truth.json: {file: {width, height, layout, background,
colour, shape, side, questions: {question: expected answer}}}.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from mllama_tpu.errors import ArgumentParser, cli_main
from mllama_tpu.tiny.data import make_scene, make_turn, render
from mllama_tpu.tiny.task import QUESTIONS

# (layout (rows, cols), shape, side): square, wide, very wide, tall, 2x2 and very tall images,
# each shape twice, each side three times.
WANTED = (
    ((1, 1), "triangle", "left"),
    ((1, 2), "square", "right"),
    ((1, 4), "circle", "left"),
    ((2, 1), "triangle", "right"),
    ((2, 2), "square", "left"),
    ((4, 1), "circle", "right"),
)
# This one is saved as a palette PNG (mode "P", not RGB): the processor must convert it.
PALETTE_INDEX = 4
SAMPLES_SEED = "samples"


def write_samples(out_dir: Path) -> dict[str, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SAMPLES_SEED)
    truth: dict[str, dict] = {}
    for index, ((rows, cols), shape, side) in enumerate(WANTED):
        scene = make_scene(rng, (rows, cols))
        while (scene.shape, scene.side) != (shape, side):  # deterministic: same rng stream
            scene = make_scene(rng, (rows, cols))
        image = render(scene)
        if index == PALETTE_INDEX:
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        name = f"{scene.colour}_{scene.shape}_{scene.side}_on_{scene.background}_{rows}x{cols}.png"
        image.save(out_dir / name)
        truth[name] = {
            "mode": image.mode,
            "width": scene.width,
            "height": scene.height,
            "layout": [rows, cols],
            "background": scene.background,
            "colour": scene.colour,
            "shape": scene.shape,
            "side": scene.side,
            "questions": {q.text: make_turn(q, scene).answer for q in QUESTIONS},
        }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/samples"))
    args = parser.parse_args()
    for name in write_samples(args.out):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    cli_main(main)
