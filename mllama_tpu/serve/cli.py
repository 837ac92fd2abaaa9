"""python_demo/server.py: load the engines, then serve the API and the page with uvicorn.

Everything that can be wrong with the flags or the model is one `error:` line before the port
is bound; the key may come from MLLAMA_API_KEY instead of --api_key (so it is not in `ps`).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from mllama_tpu.errors import ArgumentParser, UserError
from mllama_tpu.session import DEFAULT_MAX_NEW_TOKENS, existing_model

API_KEY_ENV = "MLLAMA_API_KEY"
log = logging.getLogger("mllama_tpu.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mllama_tpu.engines import BACKENDS

    p = ArgumentParser(prog="server.py", description="OpenAI-compatible chat server (and chat page at /)")
    p.add_argument("-m", "--model_path", required=True, help="NAME.bmodel, or an export dir with --backend onnx")
    p.add_argument("-t", "--tokenizer_path", default=None, help="token_config dir (default: next to the model)")
    p.add_argument("--devid", default="0", help="device id(s), comma separated: one engine per device")
    p.add_argument("--backend", choices=BACKENDS, default="bmodel")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--model_name", default=None, help="the model id clients send (default: the model's file name)")
    p.add_argument("--max_queue", type=int, default=16, help="requests that may wait for a busy engine (then 429)")
    p.add_argument("--max_body_mb", type=float, default=16.0, help="request body limit (then 413)")
    p.add_argument("--max_image_pixels", type=int, default=4096 * 4096, help="image width x height limit")
    p.add_argument("--max_messages", type=int, default=64, help="messages per conversation limit")
    p.add_argument("--default_max_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer limit when a request sets none")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def parse_devids(text: str) -> list[int]:
    """--devid 0 or 0,1,...: one engine per device, each id once."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--devid {text!r} is not a list of distinct device ids: use e.g. 0 or 0,1")
    return ids


def served_name(model: Path) -> str:
    return model.name[: -len(".bmodel")] if model.name.endswith(".bmodel") else model.name


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    for flag in ("max_queue", "max_image_pixels", "max_messages", "default_max_tokens"):
        if getattr(args, flag) < (0 if flag == "max_queue" else 1):
            raise UserError(f"--{flag} must be {'>= 0' if flag == 'max_queue' else '>= 1'}, got {getattr(args, flag)}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max_body_mb must be > 0, got {args.max_body_mb}")
    existing_model(args.model_path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check(args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mllama_tpu.serve.app import ServerConfig, create_app
    from mllama_tpu.serve.conversation import Limits, PromptCounter
    from mllama_tpu.serve.pool import EnginePool
    from mllama_tpu.session import LoadedModel
    from mllama_tpu.token_config import default_token_config, open_processor

    devids = parse_devids(args.devid)
    if args.backend == "onnx" and len(devids) > 1:
        log.info("backend onnx: %d engines on the CPU (device ids only name them)", len(devids))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        log.warning("binding %s without an API key: anyone who reaches this address can use the model", args.host)
    model = Path(args.model_path)
    token_config = default_token_config(model, args.tokenizer_path)
    counter = PromptCounter(open_processor(token_config))  # checked before the slow engine loads
    models = []
    for d in devids:
        log.info("loading %s (%s) on device %d", model, args.backend, d)
        # Each engine its own processor: the workers tokenize and decode at the same time.
        models.append(LoadedModel.open(args.backend, model, token_config, d))
    pool = EnginePool(models, args.max_queue)
    config = ServerConfig(
        served_name=args.model_name or served_name(model),
        limits=Limits(args.max_messages, args.max_image_pixels, args.default_max_tokens),
        api_key=api_key,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
    )
    app = create_app(pool, counter, config)
    log.info("serving %s on http://%s:%d (%d engine(s), SEQ %d, key %s); chat page at /",
             config.served_name, args.host, args.port, len(models), models[0].seq_length,
             "required" if api_key else "off")
    import uvicorn

    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        pool.close()
    return 0
