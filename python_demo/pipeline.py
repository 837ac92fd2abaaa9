"""Chat with Llama-3.2-Vision about an image: on a BM1684X (bmodel) or on the CPU (ONNX export).

    python python_demo/pipeline.py -m llama3.2-11b-vision_int4_512seq.bmodel -i image.jpg
    python python_demo/pipeline.py --backend onnx -m build/onnx-dir -i image.png -q "What is this?" --json

Without -q it is an interactive chat (q/quit/exit ends, clear/new starts over with a new image).
-t defaults to the token_config/ next to the model (an export dir's own, or the one compile
writes beside the bmodel), else the repo's top-level token_config/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

if __name__ == "__main__":
    # Before the heavy imports: on the simulator this process restarts once with its yield preload.
    from mllama_tpu.cmodel_yield import exec_with_preload

    exec_with_preload([str(Path(__file__).resolve()), *sys.argv[1:]])

from mllama_tpu.engines import BACKENDS  # noqa: E402
from mllama_tpu.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from mllama_tpu.images import load_image  # noqa: E402
from mllama_tpu.sampling import GENERATION_MODES, SamplingParams  # noqa: E402
from mllama_tpu.session import (DEFAULT_MAX_NEW_TOKENS, ChatSession, LoadedModel, check_max_new_tokens,  # noqa: E402
                                existing_model)
from mllama_tpu.terminal import run_interactive, run_scripted  # noqa: E402
from mllama_tpu.token_config import default_token_config, open_processor  # noqa: E402

DEFAULT_SAMPLING = SamplingParams()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DEFAULT_SAMPLING
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_path", required=True, help="NAME.bmodel, or an export dir with --backend onnx")
    p.add_argument("-t", "--tokenizer_path", default=None, help="token_config dir (default: next to the model)")
    p.add_argument("-i", "--image_path", default=None, help="image to talk about (omit for a text-only chat)")
    p.add_argument("--devid", type=int, default=0, help="device id (bmodel backend)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="penalty_sample: 0 means greedy")
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--top_k", type=int, default=d.top_k)
    p.add_argument("--repeat_penalty", type=float, default=d.repeat_penalty)
    p.add_argument("--repeat_last_n", type=int, default=d.repeat_last_n)
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--generation_mode", choices=GENERATION_MODES, default=d.mode)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sampler (penalty_sample)")
    p.add_argument("--enable_history", action="store_true", help="later turns see the earlier ones")
    p.add_argument("--backend", choices=BACKENDS, default="bmodel")
    p.add_argument("-q", "--question", action="append", default=None, help="ask this (repeatable) and exit")
    p.add_argument("--json", action="store_true", help="with -q: one JSON line per turn")
    return p.parse_args(argv)


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.generation_mode, args.temperature, args.top_p, args.top_k,
                          args.repeat_penalty, args.repeat_last_n, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_max_new_tokens(args.max_new_tokens, "--max_new_tokens")
    if args.json and not args.question:
        raise UserError("--json needs at least one -q QUESTION")
    if args.devid < 0:
        raise UserError(f"--devid {args.devid} is not a device id: use 0, 1, ...")
    sampling = sampling_from(args)
    model = existing_model(args.model_path)
    # Everything that can be checked without the model first: loading it may take long.
    image = load_image(args.image_path) if args.image_path is not None else None
    token_config = default_token_config(model, args.tokenizer_path)
    processor = open_processor(token_config)

    loaded = LoadedModel.open(args.backend, model, token_config, args.devid, processor)
    session = ChatSession(loaded, args.max_new_tokens, args.enable_history, sampling)
    if image is not None:
        session.set_image(args.image_path, image)

    if args.question:
        return run_scripted(session, args.question, args.json)
    return run_interactive(session)


if __name__ == "__main__":
    cli_main(main)
