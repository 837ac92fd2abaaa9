"""TEMPORARY: the session producer API (notes/SESSION_API.md) over today's ChatSession/generate.

Only so the server runs end to end before mllama_tpu/session.py and mllama_tpu/images.py land
on main; deleted when they do (the serve modules then import from those two instead).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mllama_tpu import REPO_ROOT
from mllama_tpu.chat import TextStream, check_token_config, eos_ids_for, open_processor
from mllama_tpu.engines import SamplingParams as _Sampling
from mllama_tpu.engines import open_engine
from mllama_tpu.errors import UserError
from mllama_tpu.inputs import PromptTooLong, image_inputs_from, pad_token_id, prefill_inputs, process


@dataclass(frozen=True)
class SamplingParams:
    mode: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repeat_penalty: float = 1.0
    repeat_last_n: int = 32
    seed: int | None = None

    def validated(self) -> "SamplingParams":
        try:
            _Sampling(**self.__dict__).validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        return self


def decode_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image = im.copy()
    except UnidentifiedImageError:
        raise UserError(f"{where} is not an image (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{where} is damaged or truncated ({e})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


@dataclass
class LoadedModel:
    engine: Any
    processor: Any
    eos_ids: list[int]
    _image: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, backend: str, model_path, token_config=None, devid: int = 0) -> "LoadedModel":
        model = Path(model_path)
        if not model.exists():
            raise UserError(f"model {model} not found: pass a NAME.bmodel (or an export dir with --backend onnx)")
        if token_config is None:
            beside = model / "token_config" if model.is_dir() else model.parent / "token_config"
            token_config = beside if beside.is_dir() else REPO_ROOT / "token_config"
        processor = open_processor(token_config)
        engine = open_engine(backend, model, [devid])
        check_token_config(Path(token_config), processor, engine)
        return cls(engine, processor, eos_ids_for(engine, Path(token_config), processor.tokenizer))

    @property
    def seq_length(self) -> int:
        return self.engine.seq_length

    def count_prompt_tokens(self, messages, image) -> int:
        return int(process(self.processor, messages, image)["input_ids"].shape[1])


@dataclass(frozen=True)
class TurnRequest:
    messages: list[dict]
    image: Any = None
    max_new_tokens: int = 512
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptAccepted:
    prompt_tokens: int


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class TurnDone:
    answer: str
    tokens: list[int]
    prompt_tokens: int
    ftl_s: float
    tps: float
    stop_reason: str


def produce_turn(model: LoadedModel, request: TurnRequest,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[Any]:
    images = sum(1 for m in request.messages if isinstance(m["content"], list)
                 for p in m["content"] if p.get("type") == "image")
    if images > 1:
        raise UserError(f"the conversation has {images} images; the model takes one")
    if images and request.image is None:
        raise UserError("an image part without an image")
    e = model.engine
    s = request.sampling.validated()
    e.set_sampling(s.mode, s.temperature, s.top_p, s.top_k, s.repeat_penalty, s.repeat_last_n, s.seed)
    features = process(model.processor, request.messages, request.image)
    try:
        prompt = prefill_inputs(features["input_ids"][0], e.seq_length, pad_token_id(model.processor),
                                features.get("cross_attention_mask"), e.num_patches, e.max_tiles)
    except PromptTooLong as err:
        raise UserError(f"{err}: shorten the conversation") from None
    if request.image is not None and model._image is not request.image:
        e.encode_image(image_inputs_from(features))
        model._image = request.image
    yield PromptAccepted(prompt.num_tokens)

    stream, tokens, answer = TextStream(model.processor.tokenizer), [], ""
    eos = set(model.eos_ids)
    t0 = time.perf_counter()
    token = e.prefill(prompt)
    t1 = time.perf_counter()
    position, reason, held = prompt.num_tokens, "eos", 0
    hold = max([len(x) for x in request.stop] or [1]) - 1
    while True:
        if token in eos:
            break
        tokens.append(token)
        answer += stream.push(token)
        cut = min([answer.find(x) for x in request.stop if x in answer] or [-1])
        if cut >= 0:
            answer, reason = answer[:cut], "stop"
            break
        if len(answer) - hold > held:
            yield TextPiece(answer[held:len(answer) - hold])
            held = len(answer) - hold
        if cancelled is not None and cancelled():
            reason = "cancelled"
            break
        if len(tokens) >= request.max_new_tokens:
            reason = "max_new_tokens"
            break
        if position >= e.seq_length:
            reason = "seqlen"
            break
        token = e.decode(token)
        position += 1
    if reason not in ("stop", "cancelled"):
        answer += stream.flush()
    if len(answer) > held:
        yield TextPiece(answer[held:])
    dt = time.perf_counter() - t1
    tps = (len(tokens) - 1) / dt if len(tokens) > 1 and dt > 0 else 0.0
    yield TurnDone(answer, tokens, prompt.num_tokens, t1 - t0, tps, reason)
