"""How much the simulator's yield preload (python_demo/cmodel_yield.c) speeds up a chat turn.

Runs pipeline.py on one bmodel and image twice per round, once with MLLAMA_CMODEL_YIELD=0 and
once with the preload, and prints first-token latency, decode speed and wall time of each and
their ratios. These are simulator numbers (host CPU), not chip numbers: see bench/chip_speed.

    .venv/bin/python -m bench.simulator_yield                       # the demo's int4 bmodel
    .venv/bin/python -m bench.simulator_yield -m NAME.bmodel -i IMAGE --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mllama_tpu import REPO_ROOT
from mllama_tpu.cmodel_yield import OPT_OUT, PRELOAD

DEMO_BMODELS = REPO_ROOT / "build" / "demo" / "bmodel-int4"
SAMPLE = REPO_ROOT / "assets" / "samples" / "green_square_left_on_red_2x2.png"


def one_turn(bmodel: Path, image: Path, question: str, tokens: int, yield_on: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    if not yield_on:
        env[OPT_OUT] = "0"
    env.setdefault("MLLAMA_SIMULATOR_LOG", os.devnull)
    cmd = [sys.executable, str(REPO_ROOT / "python_demo" / "pipeline.py"), "-m", str(bmodel), "-i", str(image),
           "-q", question, "--max_new_tokens", str(tokens), "--json"]
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"pipeline.py failed:\n{r.stderr[-2000:]}")
    turn = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ftl_s": turn["ftl_s"], "tps": turn["tps"], "wall_s": wall, "tokens": turn["tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_path", type=Path, default=None, help="bmodel (default: the demo's)")
    p.add_argument("-i", "--image_path", type=Path, default=SAMPLE)
    p.add_argument("-q", "--question", default="What color is the background?")
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    bmodel = args.model_path or next(iter(sorted(DEMO_BMODELS.glob("*.bmodel"))), None)
    if bmodel is None:
        sys.exit(f"no bmodel in {DEMO_BMODELS}: run ./run_demo.sh once, or pass -m NAME.bmodel")
    if not PRELOAD.is_file():
        sys.exit(f"{PRELOAD} not built: this engine is not the simulator build (scripts/build_engine.sh)")

    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):
        for yield_on in (False, True):
            runs[yield_on].append(one_turn(bmodel, args.image_path, args.question, args.max_new_tokens, yield_on))
    if {tuple(r["tokens"]) for rs in runs.values() for r in rs} != {tuple(runs[False][0]["tokens"])}:
        sys.exit("the tokens differ between runs: the preload must not change what the simulator computes")

    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("ftl_s", "tps", "wall_s")} for k, rs in runs.items()}
    off, on = med[False], med[True]
    print(f"{bmodel.name}, {len(runs[True][0]['tokens'])} tokens, median of {args.rounds} rounds, {os.cpu_count()} CPUs")
    print("| simulator | first token s | decode tokens/s | pipeline.py wall s |")
    print("|---|---|---|---|")
    print(f"| polling threads spin ({OPT_OUT}=0) | {off['ftl_s']:.2f} | {off['tps']:.2f} | {off['wall_s']:.1f} |")
    print(f"| with the yield preload | {on['ftl_s']:.2f} | {on['tps']:.2f} | {on['wall_s']:.1f} |")
    print(f"| ratio | {off['ftl_s'] / on['ftl_s']:.1f}x faster | {on['tps'] / off['tps']:.1f}x faster | "
          f"{off['wall_s'] / on['wall_s']:.1f}x faster |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
