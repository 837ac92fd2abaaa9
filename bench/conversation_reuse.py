"""A scripted 4-turn conversation with history on the simulator, with the cache reuse and without.

The same ChatSession (history on, one image, the toy task's four questions) runs twice on one
engine: once with the engine keeping what its KV cache holds (each turn prefills only the
tokens it adds), once with Engine.reuse_cache off (each turn prefills the whole conversation, in
the same chunks). Prints per-turn prompt tokens, tokens prefilled and first-token time, and the
ratios. Simulator host time, not chip time (bench/chip_speed has the cost model); both runs must
give the same answers.

    .venv/bin/python -m mllama_tpu.cmodel_yield -m bench.conversation_reuse       # the demo's int4 bmodel
    .venv/bin/python -m mllama_tpu.cmodel_yield -m bench.conversation_reuse -m NAME.bmodel -i IMAGE
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mllama_tpu import REPO_ROOT

SAMPLE = REPO_ROOT / "assets" / "samples" / "green_square_left_on_red_2x2.png"
QUESTIONS = ("What shape is it?", "What color is the shape?", "What color is the background?",
             "Where is the shape?")


def conversation(model, image: Path, reuse: bool) -> list[dict]:
    from mllama_tpu.session import ChatSession, TurnDone

    model.engine.reuse_cache = reuse
    model.forget_image()  # both runs encode the image on their first turn
    session = ChatSession(model, max_new_tokens=16, enable_history=True)
    session.set_image(image)
    turns = []
    for q in QUESTIONS:
        start = time.perf_counter()
        done = next(e for e in list(session.turn(q)) if isinstance(e, TurnDone))  # whole: the history grows after
        turns.append({"prompt": done.prompt_tokens, "reused": model.engine.last_reused, "ftl_s": done.ftl_s,
                      "wall_s": time.perf_counter() - start, "answer": done.answer})
    return turns


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_path", type=Path, default=None, help="bmodel (default: the demo's, built if missing)")
    p.add_argument("-i", "--image_path", type=Path, default=SAMPLE)
    args = p.parse_args()
    os.environ.setdefault("MLLAMA_SIMULATOR_LOG", os.devnull)
    from mllama_tpu.demo import build_tiny_bmodel
    from mllama_tpu.session import LoadedModel

    bmodel = args.model_path or build_tiny_bmodel()
    model = LoadedModel.open("bmodel", bmodel)
    try:
        before = conversation(model, args.image_path, reuse=False)
        after = conversation(model, args.image_path, reuse=True)
    finally:
        model.close()
    if [t["answer"] for t in before] != [t["answer"] for t in after]:
        raise SystemExit("the answers differ with and without the cache reuse")
    print(f"{bmodel.name}, prefill lengths {model.engine.prefill_lengths}, {os.cpu_count()} CPUs, simulator")
    print("| turn | prompt tokens | prefilled without reuse | first token s | prefilled with reuse | first token s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for k, (b, a) in enumerate(zip(before, after), 1):
        print(f"| {k} | {a['prompt']} | {b['prompt'] - b['reused']} | {b['ftl_s']:.2f} | {a['prompt'] - a['reused']} "
              f"| {a['ftl_s']:.2f} | {b['ftl_s'] / a['ftl_s']:.1f}x |")
    wb, wa = sum(t["wall_s"] for t in before), sum(t["wall_s"] for t in after)
    fb, fa = sum(t["ftl_s"] for t in before[1:]), sum(t["ftl_s"] for t in after[1:])
    print(f"| all 4 turns, wall s | | | {wb:.1f} | | {wa:.1f} | {wb / wa:.1f}x |")
    print(f"| turns 2-4, first token s | | | {fb:.2f} | | {fa:.2f} | {fb / fa:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
