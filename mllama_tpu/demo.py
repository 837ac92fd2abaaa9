"""The README's `./run_demo.sh`: the whole chain on the bundled tiny model.

With no arguments: export assets/tiny-mllama, compile it to an int4 bmodel (both cached under
build/demo/, so a second run starts chatting at once), then ask the C++ engine on the simulator
(or a real BM1684X) the toy task's four questions about each sample image in assets/samples/.
With arguments it is pipeline.py: `./run_demo.sh -m NAME.bmodel -t token_config -i image.jpg`.
With --serve it builds (or reuses) the same bmodel and serves it over the OpenAI API with the chat
page at http://127.0.0.1:8000/ (`./run_demo.sh --serve [server.py flags, e.g. --port 8080]`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mllama_tpu import REPO_ROOT
from mllama_tpu.cmodel_yield import exec_with_preload
from mllama_tpu.errors import cli_main

TINY_MODEL = REPO_ROOT / "assets" / "tiny-mllama"
SAMPLES = REPO_ROOT / "assets" / "samples"
WORK = REPO_ROOT / "build" / "demo"
SEQ_LENGTH = 256
MODE = "int4"


def build_tiny_bmodel() -> Path:
    from mllama_tpu.compile import compile_model
    from mllama_tpu.export import export_model

    print(f"== export {TINY_MODEL.relative_to(REPO_ROOT)} (seq_length {SEQ_LENGTH})", flush=True)
    export_model(TINY_MODEL, WORK / "onnx", SEQ_LENGTH)
    print(f"== compile {MODE} for bm1684x", flush=True)
    return compile_model(WORK / "onnx", MODE, "tiny-mllama", SEQ_LENGTH, WORK / f"bmodel-{MODE}")


def chat_about_samples(bmodel: Path) -> int:
    from mllama_tpu.session import ChatSession, LoadedModel

    truth = json.loads((SAMPLES / "truth.json").read_text())
    # The simulator's firmware prints debug lines on every dynamic net (the token head); they
    # would bury the answers, so they go to a file (read by the C++ engine when it first runs).
    log = WORK / "simulator.log"
    os.environ.setdefault("MLLAMA_SIMULATOR_LOG", str(log))
    print(f"== chat (simulator messages, if any: {log.relative_to(REPO_ROOT)})", flush=True)
    session = ChatSession(LoadedModel.open("bmodel", bmodel), max_new_tokens=32)
    right = total = 0
    for name, facts in truth.items():
        session.set_image(SAMPLES / name)
        w, h = facts["width"], facts["height"]
        print(f"\n== {name}  ({w}x{h}, {facts['layout'][0]}x{facts['layout'][1]} tiles)")
        for question, expected in facts["questions"].items():
            turn = session.ask(question)
            ok = turn.answer.strip() == expected
            right, total = right + ok, total + 1
            print(f"Q: {question}\nA: {turn.answer.strip()}   [{'ok' if ok else 'expected: ' + expected}]"
                  f"   FTL {turn.ftl_s:.2f} s, {turn.tps:.1f} tok/s")
    print(f"\n{right}/{total} answers as expected (bmodel {bmodel.relative_to(REPO_ROOT)})")
    return 0


def serve(argv: list[str]) -> int:
    from mllama_tpu.serve.cli import main as server_main

    bmodel = build_tiny_bmodel()
    log = WORK / "simulator.log"
    os.environ.setdefault("MLLAMA_SIMULATOR_LOG", str(log))  # the firmware's chatter, away from the server log
    print(f"== serve (simulator messages, if any: {log.relative_to(REPO_ROOT)})", flush=True)
    return server_main(["-m", str(bmodel), "--model_name", "tiny-mllama", *argv])


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve":
        return serve(argv[1:])
    if argv:
        sys.path.insert(0, str(REPO_ROOT / "python_demo"))
        import pipeline

        return pipeline.main(argv)
    return chat_about_samples(build_tiny_bmodel())


if __name__ == "__main__":
    exec_with_preload(["-m", "mllama_tpu.demo", *sys.argv[1:]])
    cli_main(lambda: main(sys.argv[1:]))
