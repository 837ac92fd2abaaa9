"""token_config/: the tokenizer, image processor and chat template that belong to a model.

Found beside the model, opened with one-line errors, and checked against the loaded engine so a
mismatched tokenizer is refused before it produces nonsense.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mllama_tpu import REPO_ROOT
from mllama_tpu.engines.base import Engine
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import assistant_message, load_processor, user_message

# The tokenizer may count up to 8 ids more than the logits are wide (added special tokens).
EXTRA_EMBEDDING_ROWS = 8


def default_token_config(model: Path, given: str | Path | None = None) -> Path:
    """`given` (the user's -t) if any, else the token_config/ beside the model (an export dir's
    own, or the one compile writes beside the bmodel), else the repo's top-level token_config/."""
    if given:
        return Path(given)
    beside = model / "token_config" if model.is_dir() else model.parent / "token_config"
    return beside if beside.is_dir() else REPO_ROOT / "token_config"


def open_processor(token_config: str | Path) -> Any:
    """The processor of a token_config dir, with a one-line UserError when it is not one."""
    path = Path(token_config)
    if not path.is_dir():
        raise UserError(f"token_config {path} not found: pass the token_config/ dir exported with the model (-t)")
    try:
        processor = load_processor(path)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError) for a bad dir
        raise UserError(f"cannot load the tokenizer/processor from {path} ({_first_line(e)}): "
                        "pass a token_config/ dir") from None
    if not hasattr(processor, "image_processor") or getattr(processor, "image_token_id", None) is None:
        raise UserError(
            f"{path} holds no Mllama processor (tokenizer + image processor + <|image|>): "
            "pass the token_config/ exported with the model (-t)"
        )
    try:  # a damaged chat template is found here, not at the user's first question
        probe = [user_message("?", True), assistant_message("."), user_message("?", False)]  # a kept history
        processor.apply_chat_template(probe, add_generation_prompt=True)
    except Exception as e:  # jinja2's syntax and runtime errors, transformers' "no chat template"
        raise UserError(f"the chat template of {path} does not render ({_first_line(e)}): "
                        "pass the token_config/ exported with the model (-t)") from None
    return processor


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_token_config(token_config: Path, processor: Any, engine: Engine, image_token_id: int | None) -> None:
    """The tokenizer must belong to the model: same vocabulary (up to the extra embedding rows),
    same image token, same tiling."""
    n = len(processor.tokenizer)
    v = engine.vocab_size
    remedy = "pass the token_config/ exported with this model (-t)"
    if not v <= n <= v + EXTRA_EMBEDDING_ROWS:
        raise UserError(f"token_config {token_config} has {n} tokens but the model's vocabulary is {v}: {remedy}")
    if image_token_id is not None and int(processor.image_token_id) != int(image_token_id):
        raise UserError(f"token_config {token_config} uses image token id {processor.image_token_id}, "
                        f"the model {image_token_id}: {remedy}")
    tiles = int(processor.image_processor.max_image_tiles)
    if tiles != engine.max_tiles:
        raise UserError(f"token_config {token_config} tiles images into {tiles} tiles, "
                        f"the model takes {engine.max_tiles}: {remedy}")
