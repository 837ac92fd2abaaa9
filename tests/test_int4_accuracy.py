"""Issue 5's quantized gate: the int4 bmodel on the simulator, asked as pipeline.py asks (a
ChatSession per backend, each image's questions as one scripted conversation), answers >= 90 % of
toy-task pairs right and keeps the accuracy of the f32 model (the ONNX reference on the same export).

It asks the issue's 100 held-out pairs: 25 images (every tile layout, some twice) x 4 questions.
One session per backend serves every image (pipeline.py's own flags and output are
tests/test_pipeline.py's); the two backends ask side by side on the two cores. Fewer for a quick
look: MLLAMA_INT4_SCENES=8 (one image per layout, 2 questions each).
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mllama_tpu.images import load_image
from mllama_tpu.session import ChatSession, LoadedModel
from mllama_tpu.tiny.data import make_scene, render
from mllama_tpu.tiny.task import LAYOUTS, QUESTIONS

pytestmark = pytest.mark.slow

# Neither the trainer's seeds nor the transformers gate's: images no test has seen.
SEED = 90_210
SCENES = int(os.environ.get("MLLAMA_INT4_SCENES", "25"))
QUESTIONS_PER_SCENE = 4 if SCENES >= 25 else 2


def answers(backend: str, model: Path, cases: list) -> list[list[str]]:
    """Each case's questions asked in order about its image, as `pipeline.py -i IMAGE -q ... -q ...`
    (pipeline.py's defaults: greedy, no history, --max_new_tokens 10 as the gate always asked)."""
    loaded = LoadedModel.open(backend, model)
    try:
        session = ChatSession(loaded, max_new_tokens=10)
        out = []
        for _, path, qs in cases:
            session.set_image(path, load_image(path))
            out.append([session.ask(q.text).answer.strip() for q in qs])
        return out
    finally:
        loaded.close()


def test_int4_keeps_the_toy_task_accuracy(tiny_bmodel, tiny_onnx_dir: Path, tmp_path: Path):
    bmodel = tiny_bmodel("int4")
    rng = random.Random(SEED)
    cases = []
    for i in range(SCENES):
        scene = make_scene(rng, LAYOUTS[i % len(LAYOUTS)])
        path = tmp_path / f"scene{i}.png"
        render(scene).save(path)
        # Rotate through the questions so every kind is asked across the images.
        qs = [QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(QUESTIONS_PER_SCENE)]
        cases.append((scene, path, qs))

    # The simulator and onnxruntime both release the GIL while they compute.
    with ThreadPoolExecutor(2) as pool:
        int4_job = pool.submit(answers, "bmodel", bmodel, cases)
        f32_job = pool.submit(answers, "onnx", tiny_onnx_dir, cases)
        int4, f32 = int4_job.result(), f32_job.result()

    total = right_int4 = right_f32 = same = 0
    misses = []
    for (scene, _, qs), a4, a32 in zip(cases, int4, f32):
        for q, x4, x32 in zip(qs, a4, a32):
            expected = q.answer(scene.value(q.key))
            total += 1
            right_int4 += x4 == expected
            right_f32 += x32 == expected
            same += x4 == x32
            if x4 != expected:
                misses.append((scene.layout, q.text, x4, expected))
    acc4, acc32 = right_int4 / total, right_f32 / total
    print(f"int4 {acc4:.0%}, f32 reference {acc32:.0%}, int4 == f32 on {same}/{total} pairs")
    assert same / total >= 0.9, f"int4 answers differ from f32 on {total - same}/{total} pairs; misses {misses}"
    assert acc4 >= acc32 - 0.1, f"int4 accuracy {acc4:.0%} vs f32 {acc32:.0%}; misses {misses}"
    assert acc4 >= 0.9, f"int4 accuracy {acc4:.0%} < 90 %; misses {misses}"
