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

from mllama_tpu import REPO_ROOT  # noqa: E402
from mllama_tpu.chat import ChatSession, load_image, open_processor, run_interactive, run_scripted  # noqa: E402
from mllama_tpu.engines import BACKENDS, GENERATION_MODES, SamplingParams, open_engine  # noqa: E402
from mllama_tpu.errors import UserError, cli_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_path", required=True, help="NAME.bmodel, or an export dir with --backend onnx")
    p.add_argument("-t", "--tokenizer_path", default=None, help="token_config dir (default: next to the model)")
    p.add_argument("-i", "--image_path", default=None, help="image to talk about (omit for a text-only chat)")
    p.add_argument("--devid", default="0", help="device id(s), comma separated (bmodel backend)")
    p.add_argument("--temperature", type=float, default=1.0, help="penalty_sample: 0 means greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--repeat_penalty", type=float, default=1.0)
    p.add_argument("--repeat_last_n", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--generation_mode", choices=GENERATION_MODES, default="greedy")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (penalty_sample)")
    p.add_argument("--enable_history", action="store_true", help="later turns see the earlier ones")
    p.add_argument("--backend", choices=BACKENDS, default="bmodel")
    p.add_argument("-q", "--question", action="append", default=None, help="ask this (repeatable) and exit")
    p.add_argument("--json", action="store_true", help="with -q: one JSON line per turn")
    return p.parse_args(argv)


def default_token_config(model: Path) -> Path:
    """The token_config/ that belongs to the model if there is one beside it, else the repo's."""
    beside = model / "token_config" if model.is_dir() else model.parent / "token_config"
    return beside if beside.is_dir() else REPO_ROOT / "token_config"


def parse_devids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--devid {text!r} is not a device id list: use e.g. 0 or 0,1") from None
    if not ids or any(i < 0 for i in ids):
        raise UserError(f"--devid {text!r} is not a device id list: use e.g. 0 or 0,1")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.json and not args.question:
        raise UserError("--json needs at least one -q QUESTION")
    sampling = SamplingParams(
        args.generation_mode, args.temperature, args.top_p, args.top_k,
        args.repeat_penalty, args.repeat_last_n, args.seed,
    )
    try:
        sampling.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    model = Path(args.model_path)
    if not model.exists():
        raise UserError(f"model {model} not found: pass a NAME.bmodel (or an export dir with --backend onnx)")
    # Everything that can be checked without the model first: loading it may take long.
    if args.image_path is not None:
        load_image(args.image_path)
    token_config = Path(args.tokenizer_path) if args.tokenizer_path else default_token_config(model)
    processor = open_processor(token_config)
    devids = parse_devids(args.devid)

    engine = open_engine(args.backend, model, devids)
    session = ChatSession.create(engine, token_config, args.max_new_tokens, args.enable_history, processor)
    session.set_sampling(sampling)
    if args.image_path is not None:
        session.set_image(args.image_path)

    if args.question:
        return run_scripted(session, args.question, args.json)
    return run_interactive(session)


if __name__ == "__main__":
    cli_main(main)
