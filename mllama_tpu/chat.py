"""A chat with one image: conversation history, turns, streaming text, the interactive loop.

The session owns the processor (tokenizer + image processor + chat template) and an engine.
The vision encoder runs once per image; with history every turn re-prefills the whole
conversation (the engine's KV cache holds one prompt), and a conversation that no longer fits
the static sequence length starts afresh with a notice.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from mllama_tpu.engines.base import Engine, SamplingParams
from mllama_tpu.errors import UserError
from mllama_tpu.generate import STOP_SEQLEN, Generation, generate
from mllama_tpu.inputs import (
    PromptTooLong,
    assistant_message,
    image_inputs_from,
    load_processor,
    pad_token_id,
    prefill_inputs,
    process,
    user_message,
)

QUIT_COMMANDS = ("q", "quit", "exit")
RESET_COMMANDS = ("clear", "new")

# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Any:
    """Open an image file as 8-bit RGB; any PIL mode works, a broken file is a UserError.

    16-bit and 32-bit grey images are scaled to 8 bits (PIL's own convert would clip them),
    images with transparency are put on white (what a viewer shows).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found: check the path")
    try:
        with Image.open(path) as im:
            # PIL widens 16-bit grey PNGs to mode "I"; the raw mode still tells the bit depth.
            sixteen_bit = any("16" in str(tile[3]) for tile in (im.tile or []))
            im.load()  # decode now: a truncated file fails here, not inside the processor
            image = im.copy()
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read (PNG, JPEG, BMP, ...): pass an image file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image {path} is damaged or truncated ({e}): pass a complete image file") from None

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if sixteen_bit or mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    if image.width < 1 or image.height < 1:
        raise UserError(f"image {path} is empty ({image.width}x{image.height})")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# streaming text
# ---------------------------------------------------------------------------------------------


class TextStream:
    """Turns token ids into text pieces as they come, never splitting a UTF-8 character.

    A byte-level tokenizer may emit part of a multi-byte character; decoding it alone gives
    U+FFFD. The held-back tail is released once the following tokens complete it (or at the end).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._decode()
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # maybe an incomplete character: wait for the next token
        piece = text[self.emitted : end]
        self.emitted = end
        return piece

    def flush(self) -> str:
        text = self._decode()
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------


@dataclass
class Turn:
    question: str
    answer: str
    tokens: list[int]
    ftl_s: float
    tps: float
    stop_reason: str
    prompt_tokens: int
    restarted: bool = False  # history was dropped because the conversation no longer fit

    def as_json(self) -> str:
        return json.dumps(
            {
                "question": self.question,
                "answer": self.answer,
                "tokens": self.tokens,
                "ftl_s": round(self.ftl_s, 6),
                "tps": round(self.tps, 3),
            },
            ensure_ascii=False,
        )


def eos_ids_for(engine: Engine, token_config: Path, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the export's list, the tokenizer's EOS and generation_config's."""
    ids = list(getattr(engine, "eos_token_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = token_config / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    return list(dict.fromkeys(ids))


def check_token_config(token_config: Path, processor: Any, engine: Engine) -> None:
    """The tokenizer must belong to the model: same vocabulary size (Mllama's embedding has 8
    extra rows, e.g. for <|image|>, so the tokenizer may be up to 8 ids larger) and image token."""
    n = len(processor.tokenizer)
    v = engine.vocab_size
    if not v <= n <= v + 8:
        raise UserError(
            f"token_config {token_config} has {n} tokens but the model's vocabulary is {v}: "
            "pass the token_config/ exported with this model (-t)"
        )
    itid = getattr(engine, "image_token_id", None)
    if itid is not None and int(processor.image_token_id) != int(itid):
        raise UserError(
            f"token_config {token_config} uses image token id {processor.image_token_id}, the model {itid}: "
            "pass the token_config/ exported with this model (-t)"
        )
    tiles = int(processor.image_processor.max_image_tiles)
    if tiles != engine.max_tiles:
        raise UserError(
            f"token_config {token_config} tiles images into {tiles} tiles, the model takes {engine.max_tiles}: "
            "pass the token_config/ exported with this model (-t)"
        )


def open_processor(token_config: str | Path) -> Any:
    """The processor of a token_config dir, with a one-line UserError when it is not one."""
    path = Path(token_config)
    if not path.is_dir():
        raise UserError(f"token_config {path} not found: pass the token_config/ dir exported with the model (-t)")
    try:
        processor = load_processor(path)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError) for a bad dir
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer/processor from {path} ({first}): pass a token_config/ dir") from None
    if not hasattr(processor, "image_processor") or getattr(processor, "image_token_id", None) is None:
        raise UserError(
            f"{path} holds no Mllama processor (tokenizer + image processor + <|image|>): "
            "pass the token_config/ exported with the model (-t)"
        )
    return processor


@dataclass
class ChatSession:
    engine: Engine
    processor: Any
    eos_ids: list[int]
    max_new_tokens: int = 512
    enable_history: bool = False
    image: Any | None = None
    image_path: str | None = None
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        engine: Engine,
        token_config: str | Path,
        max_new_tokens: int = 512,
        enable_history: bool = False,
        processor: Any | None = None,
    ) -> "ChatSession":
        """A session on `engine` with the token_config's processor (pass it if already loaded)."""
        processor = processor if processor is not None else open_processor(token_config)
        check_token_config(Path(token_config), processor, engine)
        eos = eos_ids_for(engine, Path(token_config), processor.tokenizer)
        return cls(engine, processor, eos, max_new_tokens, enable_history)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def set_sampling(self, params: SamplingParams) -> None:
        try:
            params.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        self.engine.set_sampling(
            params.mode, params.temperature, params.top_p, params.top_k,
            params.repeat_penalty, params.repeat_last_n, params.seed,
        )

    def set_image(self, path: str | Path | None) -> None:
        """Load, tile and encode a new image (None: text-only); the conversation starts afresh."""
        if path is None:
            self.image, self.image_path = None, None
            self.engine.clear_image()
        else:
            image = load_image(path)
            features = process(self.processor, [user_message("", True)], image)
            self.engine.encode_image(image_inputs_from(features))
            self.image, self.image_path = image, str(path)
        self.reset()

    def reset(self) -> None:
        self.messages = []

    @property
    def answer_room(self) -> int:
        """Tokens a kept conversation must leave free for the answer; below that it starts afresh
        (a history that only just fits would cut the answer after a token or two)."""
        return min(self.max_new_tokens, max(1, self.engine.seq_length // 8))

    def _history(self) -> list[dict]:
        return self.messages if self.enable_history else []

    def _conversation(self, question: str, history: list[dict]) -> list[dict]:
        # The image rides with the first user turn of the conversation.
        return history + [user_message(question, self.image is not None and not history)]

    def prompt_length(self, question: str) -> int:
        """Tokens the next turn's prompt would have (history included), before any refusal."""
        convo = self._conversation(question.strip(), self._history())
        return int(process(self.processor, convo, self.image)["input_ids"].shape[1])

    def _prompt(self, messages: list[dict]):
        features = process(self.processor, messages, self.image)
        return prefill_inputs(
            features["input_ids"][0],
            self.engine.seq_length,
            pad_token_id(self.processor),
            features.get("cross_attention_mask"),
            self.engine.num_patches,
            self.engine.max_tiles,
        )

    def ask(
        self,
        question: str,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Turn:
        """One turn: prompt (with the history if kept), generate, stream the text, remember it.

        on_start runs once the prompt is accepted (a refused prompt raises UserError before it).
        """
        question = question.strip()
        if not question:
            raise UserError("empty question: type a question")
        history = self._history()
        convo = self._conversation(question, history)
        restarted = False
        try:
            prompt = self._prompt(convo)
            if history and prompt.num_tokens + self.answer_room > self.engine.seq_length:
                raise PromptTooLong(prompt.num_tokens, self.engine.seq_length)
        except PromptTooLong as e:
            if not history:
                raise UserError(f"{e}: ask a shorter question") from None
            restarted = True
            convo = self._conversation(question, [])
            try:
                prompt = self._prompt(convo)
            except PromptTooLong as e2:
                self.messages = []
                raise UserError(f"{e2}: ask a shorter question (history cleared)") from None

        if on_start:
            on_start()
        stream = TextStream(self.tokenizer)
        pieces: list[str] = []

        def on_token(token: int) -> None:
            piece = stream.push(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)

        gen: Generation = generate(self.engine, prompt, self.eos_ids, self.max_new_tokens, on_token)
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        answer = "".join(pieces)
        if self.enable_history:
            self.messages = convo + [assistant_message(answer)]
        return Turn(question, answer, gen.tokens, gen.ftl_s, gen.tps, gen.stop_reason, prompt.num_tokens, restarted)


# ---------------------------------------------------------------------------------------------
# the two front ends: scripted questions and the interactive loop
# ---------------------------------------------------------------------------------------------


def notices(turn: Turn) -> list[str]:
    out = []
    if turn.restarted:
        out.append("(the conversation no longer fit the model's sequence length: started a new one)")
    if turn.stop_reason == STOP_SEQLEN:
        out.append(f"(stopped: the model's sequence length is full after {turn.prompt_tokens} prompt tokens)")
    return out


def run_scripted(session: ChatSession, questions: Iterable[str], as_json: bool, out: TextIO = sys.stdout) -> int:
    """Ask each question in order in one conversation. Returns 0, or 2 if a turn was refused."""
    status = 0
    for q in questions:
        try:
            if as_json:
                turn = session.ask(q)
                print(turn.as_json(), file=out, flush=True)
                for n in notices(turn):
                    print(n, file=sys.stderr)
            else:
                print(f"Question: {q}", file=out, flush=True)
                turn = session.ask(
                    q,
                    lambda s: print(s, end="", file=out, flush=True),
                    lambda: print("Answer: ", end="", file=out, flush=True),
                )
                print(file=out)
                for n in notices(turn):
                    print(n, file=out)
                print(f"FTL: {turn.ftl_s:.3f} s  TPS: {turn.tps:.2f} token/s", file=out, flush=True)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            status = 2
    return status


def _read(prompt: str, inp: TextIO, out: TextIO) -> str | None:
    """One line from the user, None at end of input."""
    print(prompt, end="", file=out, flush=True)
    line = inp.readline()
    if not line:
        return None
    return line.rstrip("\r\n")


def run_interactive(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """The chat loop: q/quit/exit ends, clear/new starts over (and offers a new image).

    A refused turn (bad image path, prompt too long) prints one line and the loop goes on.
    """
    print(
        "Type a question; 'clear' or 'new' starts a new conversation, 'q', 'quit' or 'exit' ends.",
        file=out,
        flush=True,
    )
    while True:
        line = _read("\nQuestion: ", inp, out)
        if line is None:
            print(file=out)
            return 0
        q = line.strip()
        if not q:
            continue
        if q.lower() in QUIT_COMMANDS:
            return 0
        if q.lower() in RESET_COMMANDS:
            _new_conversation(session, inp, out)
            continue
        try:
            turn = session.ask(
                q,
                lambda s: print(s, end="", file=out, flush=True),
                lambda: print("\nAnswer: ", end="", file=out, flush=True),
            )
        except UserError as e:
            print(f"error: {e}", file=out, flush=True)
            continue
        except KeyboardInterrupt:
            # Ctrl-C while answering stops the answer, not the chat (at the prompt it ends it).
            print("\n(answer interrupted; it is not kept in the history)", file=out, flush=True)
            continue
        print(file=out)
        for n in notices(turn):
            print(n, file=out)
        print(f"FTL: {turn.ftl_s:.3f} s  TPS: {turn.tps:.2f} token/s", file=out, flush=True)


def _new_conversation(session: ChatSession, inp: TextIO, out: TextIO) -> None:
    current = session.image_path or "none"
    line = _read(f"New image path (empty keeps {current}): ", inp, out)
    path = (line or "").strip()
    if path:
        try:
            session.set_image(path)
            print(f"Image: {path}", file=out, flush=True)
            return
        except UserError as e:
            print(f"error: {e}; keeping {current}", file=out, flush=True)
    session.reset()
    print("New conversation.", file=out, flush=True)
