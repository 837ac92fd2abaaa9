"""One request path: a conversation (and its one image) in, turn events out.

`produce_turn` is the only producer of what a turn shows: the prompt accepted, text pieces as
they come, the turn done with its stats. Front ends only render those events: the terminal
(mllama_tpu.terminal: interactive, scripted, JSON) and the HTTP server. `ChatSession` adds what
a CLI chat keeps between turns: the history, the current image, the restart when a kept
conversation no longer fits SEQ.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mllama_tpu.engines import Engine, open_engine
from mllama_tpu.errors import UserError
from mllama_tpu.generate import STOP_SEQLEN, Generation, generate_tokens
from mllama_tpu.images import load_image
from mllama_tpu.inputs import (
    ImageInputs,
    PrefillInputs,
    PromptTooLong,
    assistant_message,
    count_prompt_tokens,
    pad_token_id,
    prefill_inputs,
    prepare_image,
    prompt_features,
    user_message,
)
from mllama_tpu.manifest import token_facts
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.text_stream import TextStream
from mllama_tpu.token_config import check_token_config, default_token_config, open_processor

STOP_STRING = "stop"
STOP_CANCELLED = "cancelled"
# An answer's token limit when the user sets none: the CLI's --max_new_tokens and the server's
# --default_max_tokens.
DEFAULT_MAX_NEW_TOKENS = 512


def check_max_new_tokens(n: int, name: str = "max_new_tokens") -> int:
    """The one check of an answer limit (a CLI flag checks it at startup by its flag's name)."""
    if n < 1:
        raise UserError(f"{name} must be >= 1, got {n}")
    return n


def too_many_images(n_images: int, where: str = "") -> str:
    """The one refusal of a second image in a conversation (the session's UserError, the
    server's 400 with the parts' places as `where`)."""
    at = f" ({where})" if where else ""
    return (f"the conversation has {n_images} images{at}; the model takes one image per conversation: "
            "start a new conversation for another image")


def existing_model(model_path: str | Path) -> Path:
    """The model path the user gave, or the one error for a missing one (CLI, server, session)."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"model {path} not found: pass a NAME.bmodel (or an export dir with --backend onnx)")
    return path


class EngineFailed(Exception):
    """The engine (device or runtime) failed during a turn. Not the user's input: the turn is
    lost, and what the device held for it (the encoded image) is no longer trusted."""


# ---------------------------------------------------------------------------------------------
# the model: an engine, its processor, its stop ids, the image it has encoded
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """One engine with its processor and EOS ids; serves one turn at a time."""

    engine: Engine
    processor: Any
    eos_ids: list[int]
    _image_key: str | None = field(default=None, repr=False)
    _image: ImageInputs | None = field(default=None, repr=False)

    @classmethod
    def open(cls, backend: str, model_path: str | Path, token_config: str | Path | None = None,
             devid: int = 0, processor: Any | None = None) -> "LoadedModel":
        """Load the model; every bad input is a UserError (checked before the slow load where it can be)."""
        model_path = existing_model(model_path)
        token_config = default_token_config(model_path, token_config)
        processor = processor if processor is not None else open_processor(token_config)
        engine = open_engine(backend, model_path, devid)
        try:
            return cls.on(engine, processor, token_config)
        except UserError:
            engine.close()
            raise

    @classmethod
    def on(cls, engine: Engine, processor: Any, token_config: Path) -> "LoadedModel":
        facts = token_facts(engine.model_dir, Path(token_config))
        check_token_config(Path(token_config), processor, engine, facts.image_token_id)
        eos = facts.eos_ids + ([int(processor.tokenizer.eos_token_id)]
                               if processor.tokenizer.eos_token_id is not None else [])
        return cls(engine, processor, list(dict.fromkeys(eos)))

    @property
    def seq_length(self) -> int:
        return self.engine.seq_length

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def use_image(self, image: Any | None) -> ImageInputs | None:
        """The tiles of `image`, encoded on the engine unless it is the one encoded last."""
        if image is None:
            return None
        key = hashlib.sha256(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()
        if key != self._image_key:
            self._image_key = None
            tiles = prepare_image(self.processor, image)
            self.engine.encode_image(tiles)
            self._image_key, self._image = key, tiles
        return self._image

    def prompt(self, messages: Sequence[dict], image: ImageInputs | None) -> PrefillInputs:
        """The prefill inputs of a conversation; PromptTooLong past SEQ."""
        features = prompt_features(self.processor, messages, image)
        return prefill_inputs(features["input_ids"][0], self.seq_length, pad_token_id(self.processor),
                              features.get("cross_attention_mask"), self.engine.num_patches, self.engine.max_tiles)

    def count_prompt_tokens(self, messages: Sequence[dict]) -> int:
        return count_prompt_tokens(self.processor, messages)

    def forget_image(self) -> None:
        """After an engine failure: the next turn with an image encodes it again."""
        self._image_key, self._image = None, None

    def close(self) -> None:
        self.engine.close()


# ---------------------------------------------------------------------------------------------
# a turn: the request and the events it produces
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnRequest:
    messages: list[dict]  # chat-template messages; at most one {"type": "image"} part in all
    image: Any | None = None  # the conversation's one image, 8-bit RGB (mllama_tpu.images)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()  # the answer ends before the first of these


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
    stop_reason: str  # generate's STOP_* or STOP_STRING / STOP_CANCELLED


TurnEvent = PromptAccepted | TextPiece | TurnDone


def image_parts(messages: Sequence[dict]) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def message_texts(messages: Sequence[dict]) -> Iterator[str]:
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content
                        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))


def produce_turn(model: LoadedModel, request: TurnRequest,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[TurnEvent]:
    """Run one turn. A refused request raises UserError before PromptAccepted; `cancelled` is
    polled between tokens and ends the turn at the next one."""
    check_max_new_tokens(request.max_new_tokens)
    n_images = image_parts(request.messages)
    if n_images > 1:
        raise UserError(too_many_images(n_images))
    if n_images and request.image is None:
        raise UserError("the conversation has an image part but no image was given")
    if request.image is not None and not n_images:
        raise UserError("an image was given but no message has an image part to place it")
    image_token = getattr(model.processor, "image_token", None)
    if image_token and any(image_token in text for text in message_texts(request.messages)):
        # The tokenizer would read it as a second image slot (transformers' masks then disagree).
        raise UserError(f"a message's text contains {image_token}, the model's image token: remove it "
                        "(the image is placed by its image part)")
    with _engine_step(model, "encoding the image"):
        image = model.use_image(request.image)
    prompt = model.prompt(request.messages, image)
    model.engine.set_sampling(request.sampling)
    yield PromptAccepted(prompt.num_tokens)

    stream = TextStream(model.tokenizer, request.stop)
    answer: list[str] = []
    gen = Generation()
    for token in _engine_tokens(model, generate_tokens(model.engine, prompt, model.eos_ids,
                                                       request.max_new_tokens, gen), gen):
        piece = stream.push(token)
        if piece:
            answer.append(piece)
            yield TextPiece(piece)
        if stream.stopped:
            gen.stop(STOP_STRING)
            break
        if cancelled is not None and cancelled():
            gen.stop(STOP_CANCELLED)
            break
    tail = stream.flush()
    if tail:
        answer.append(tail)
        yield TextPiece(tail)
    yield TurnDone("".join(answer), gen.tokens, prompt.num_tokens, gen.ftl_s, gen.tps, gen.stop_reason)


@contextlib.contextmanager
def _engine_step(model: LoadedModel, doing: str) -> Iterator[None]:
    """The one place an engine's RuntimeError (a failed net launch, a device call) becomes
    EngineFailed with one line: what failed, while doing what. Every turn prefills the whole
    conversation, so no KV state outlives it; only the encoded image does, and it is dropped."""
    try:
        yield
    except RuntimeError as e:
        model.forget_image()
        raise EngineFailed(f"the engine failed while {doing}: {e}") from e


def _engine_tokens(model: LoadedModel, tokens: Iterator[int], gen: Generation) -> Iterator[int]:
    """`tokens` with each engine step under _engine_step; closing this closes `tokens` at once
    (generate's timings are final then, before TurnDone reads them)."""
    try:
        while True:
            with _engine_step(model, "reading the prompt (prefill)" if not gen.tokens else
                              f"writing answer token {len(gen.tokens) + 1} (decode)"):
                token = next(tokens, None)
            if token is None:
                return
            yield token
    finally:
        tokens.close()


# ---------------------------------------------------------------------------------------------
# the CLI chat: history, the current image, restarting a conversation that outgrew SEQ
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """Something the user should know about the turn, not part of the answer."""

    text: str


RESTART_NOTICE = "(the conversation no longer fit the model's sequence length: started a new one)"
ENGINE_FAILED_ADVICE = ("the conversation was restarted (its history dropped; the image is kept and encoded again): "
                        "ask again; if it keeps failing, restart the program and check the device")


def stop_notice(done: TurnDone) -> str | None:
    if done.stop_reason == STOP_SEQLEN:
        return f"(stopped: the model's sequence length is full after {done.prompt_tokens} prompt tokens)"
    return None


@dataclass
class Turn:
    """A finished turn of the chat, as the scripted and JSON front ends report it."""

    question: str
    answer: str
    tokens: list[int]
    ftl_s: float
    tps: float
    stop_reason: str
    prompt_tokens: int
    notices: list[str] = field(default_factory=list)

    @property
    def restarted(self) -> bool:
        """History was dropped because the conversation no longer fit."""
        return RESTART_NOTICE in self.notices


@dataclass
class ChatSession:
    model: LoadedModel
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    enable_history: bool = False
    sampling: SamplingParams = SamplingParams()
    image: Any | None = None
    image_path: str | None = None
    messages: list[dict] = field(default_factory=list)

    @property
    def engine(self) -> Engine:
        return self.model.engine

    def set_sampling(self, params: SamplingParams) -> None:
        self.sampling = params

    def set_image(self, path: str | Path | None, image: Any | None = None) -> None:
        """Load (unless `image` is that file, already loaded) and encode a new image; None: text
        only. The conversation starts afresh."""
        if path is None:
            self.image, self.image_path = None, None
        else:
            image = image if image is not None else load_image(path)
            try:
                with _engine_step(self.model, f"encoding the image {path}"):
                    self.model.use_image(image)
            except EngineFailed as e:
                raise UserError(f"{e}: try again; if it keeps failing, restart the program and check the device") from None
            self.image, self.image_path = image, str(path)
        self.reset()

    def reset(self) -> None:
        self.messages = []

    @property
    def answer_room(self) -> int:
        """Tokens a kept conversation must leave free for the answer; below that it starts afresh
        (a history that only just fits would cut the answer after a token or two)."""
        return min(self.max_new_tokens, max(1, self.model.seq_length // 8))

    def _conversation(self, question: str, history: list[dict]) -> list[dict]:
        # The image rides with the first user turn of the conversation.
        return history + [user_message(question, self.image is not None and not history)]

    def prompt_length(self, question: str) -> int:
        """Tokens the next turn's prompt would have (history included), before any refusal."""
        history = self.messages if self.enable_history else []
        return self.model.count_prompt_tokens(self._conversation(question.strip(), history))

    def _request(self, convo: list[dict]) -> TurnRequest:
        return TurnRequest(convo, self.image, self.max_new_tokens, self.sampling)

    def _fitting_conversation(self, question: str) -> tuple[list[dict], bool]:
        """The conversation to send and whether it was restarted: the history (if kept) while it
        leaves answer_room, else the question alone; a question too long alone is refused."""
        history = self.messages if self.enable_history else []
        convo = self._conversation(question, history)
        tokens = self.model.count_prompt_tokens(convo)
        if tokens + (self.answer_room if history else 0) <= self.model.seq_length:
            return convo, False
        if not history:
            raise UserError(f"{PromptTooLong(tokens, self.model.seq_length)}: ask a shorter question")
        return self._conversation(question, []), True

    def turn(self, question: str) -> Iterator[TurnEvent | Notice]:
        """One turn's events; the history (if kept) grows by it once it is done. A turn the
        engine fails keeps nothing: the next one starts a new conversation (a history whose last
        answer never came would not be the conversation the user had)."""
        question = question.strip()
        if not question:
            raise UserError("empty question: type a question")
        convo, restarted = self._fitting_conversation(question)
        done = None
        try:
            events = _started(produce_turn(self.model, self._request(convo)))
            if restarted:
                yield Notice(RESTART_NOTICE)
            for event in events:
                if isinstance(event, TurnDone):
                    done = event
                yield event
        except PromptTooLong as e:
            self.messages = []
            raise UserError(f"{e}: ask a shorter question" + (" (history cleared)" if restarted else "")) from None
        except EngineFailed as e:
            self.messages = []
            raise UserError(f"{e}; {ENGINE_FAILED_ADVICE}") from None
        if self.enable_history:
            self.messages = convo + [assistant_message(done.answer)]
        if notice := stop_notice(done):
            yield Notice(notice)

    def ask(self, question: str) -> Turn:
        """One whole turn (the scripted front ends and tests)."""
        notices, done = [], None
        for event in self.turn(question):
            if isinstance(event, Notice):
                notices.append(event.text)
            elif isinstance(event, TurnDone):
                done = event
        assert done is not None, "a turn always ends with TurnDone"
        return Turn(question.strip(), done.answer, done.tokens, done.ftl_s, done.tps, done.stop_reason,
                    done.prompt_tokens, notices)


def _started(events: Iterator[TurnEvent]) -> Iterator[TurnEvent]:
    """Runs `events` up to its first event now, so a refused request raises here, not mid-render."""
    first = next(events)

    def chain() -> Iterator[TurnEvent]:
        yield first
        yield from events

    return chain()
