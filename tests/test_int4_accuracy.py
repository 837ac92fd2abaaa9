"""Issue 5's quantized gate: the int4 bmodel on the simulator, asked through pipeline.py --json,
keeps the toy task's accuracy (>= 90 % of 100 held-out (image, question) pairs)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.tiny.data import make_scene, render
from mllama_tpu.tiny.task import LAYOUTS, QUESTIONS

pytestmark = pytest.mark.slow

# Neither the trainer's seeds nor the transformers gate's: images no test has seen.
SEED = 90_210
SCENES = 25  # x 4 questions = 100 pairs


def ask_about(bmodel: Path, image: Path) -> list[dict]:
    cmd = [sys.executable, str(REPO_ROOT / "python_demo" / "pipeline.py"), "-m", str(bmodel), "-i", str(image),
           "--max_new_tokens", "16", "--json"]
    for q in QUESTIONS:
        cmd += ["-q", q.text]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_int4_answers_the_toy_task(tiny_bmodel, tmp_path: Path):
    bmodel = tiny_bmodel("int4")
    rng = random.Random(SEED)
    scenes = [make_scene(rng, LAYOUTS[i % len(LAYOUTS)]) for i in range(SCENES)]
    images = []
    for i, scene in enumerate(scenes):
        path = tmp_path / f"scene{i}.png"
        render(scene).save(path)
        images.append(path)
    # The simulator runs one net at a time per process: two processes use both cores.
    with ThreadPoolExecutor(2) as pool:
        turns = list(pool.map(lambda p: ask_about(bmodel, p), images))

    misses = []
    for scene, answers in zip(scenes, turns):
        assert [a["question"] for a in answers] == [q.text for q in QUESTIONS]
        for q, a in zip(QUESTIONS, answers):
            expected = q.answer(scene.value(q.key))
            if a["answer"].strip() != expected:
                misses.append((scene.layout, q.text, a["answer"], expected))
    total = SCENES * len(QUESTIONS)
    accuracy = 1 - len(misses) / total
    assert accuracy >= 0.90, f"int4 accuracy {accuracy:.0%} over {total} pairs; misses: {misses[:10]}"
