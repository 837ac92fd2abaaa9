"""An OpenAI chat request -> the session's TurnRequest, refusing what the model cannot answer.

Everything that can be refused is refused here, before the request waits for an engine: an
unknown model name, unsupported options, a second image, an image that is not a data URL, a
prompt longer than SEQ, max_tokens beyond what SEQ leaves after the prompt.

Sampling (OpenAI's fields onto the model's two token heads):
- no temperature, or temperature 0, and no top_p / frequency_penalty: greedy (what pipeline.py
  does by default, and deterministic);
- otherwise penalty_sample with temperature (1 when absent, OpenAI's default), top_p, top_k (an
  extension, default 50) and seed;
- frequency_penalty f in [-2, 2] becomes the multiplicative repeat penalty 2 ** (f / 2) over the
  last 32 tokens: 0 -> 1 (off), 2 -> 2, -2 -> 0.5 (repeats favoured). OpenAI's penalty is
  additive per occurrence; the model's head divides a repeated token's logit instead, so the
  mapping keeps the sign and the range, not the exact numbers.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from mllama_tpu.errors import UserError
from mllama_tpu.inputs import PromptTooLong, count_prompt_tokens
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.session import DEFAULT_MAX_NEW_TOKENS, TurnRequest, too_many_images
from mllama_tpu.serve.errors import ApiError
from mllama_tpu.serve.image_url import image_from_url
from mllama_tpu.serve.schema import ChatCompletionRequest, ImagePart, TextPart


@dataclass(frozen=True)
class Limits:
    max_messages: int = 64
    max_image_pixels: int = 4096 * 4096
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class PreparedTurn:
    turn: TurnRequest
    prompt_tokens: int


class PromptCounter:
    """Prompt tokens of a conversation, on the request side, before it waits for an engine.

    inputs.count_prompt_tokens on the server's own processor (not an engine's, which its worker
    uses), behind a lock: a fast tokenizer is not safe to share across threads.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict]) -> int:
        with self._lock:
            return count_prompt_tokens(self.processor, messages)


def frequency_to_repeat_penalty(frequency_penalty: float) -> float:
    return 2.0 ** (frequency_penalty / 2.0)


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    extra = req.model_extra or {}
    if req.presence_penalty not in (None, 0, 0.0):
        raise ApiError(400, "presence_penalty is not supported: use frequency_penalty (mapped onto the repeat penalty)",
                       "presence_penalty", "unsupported_parameter")
    for name in ("tools", "functions", "logit_bias", "audio"):
        if extra.get(name):
            raise ApiError(400, f"{name} is not supported by this server: send a plain chat request",
                           name, "unsupported_parameter")
    if extra.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this server", "tool_choice", "unsupported_parameter")
    if extra.get("logprobs"):
        raise ApiError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    fmt = extra.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported: the answer is plain text",
                       "response_format", "unsupported_parameter")


def sampling_of(req: ChatCompletionRequest) -> SamplingParams:
    samples = bool(req.temperature) or req.top_p not in (None, 1, 1.0) or bool(req.frequency_penalty)
    if not samples:
        return SamplingParams()
    try:
        return SamplingParams(
            mode="penalty_sample",
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or SamplingParams.top_k,  # unset or 0: the default
            repeat_penalty=frequency_to_repeat_penalty(req.frequency_penalty or 0.0),
            seed=req.seed,
        )
    except UserError as e:
        raise ApiError(400, str(e), None, "invalid_value") from None


def stops_of(req: ChatCompletionRequest) -> tuple[str, ...]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
    return tuple(stops)


def template_messages(req: ChatCompletionRequest, limits: Limits):
    """The chat-template messages (content as parts; the image part exactly where the client put
    it) and the conversation's one image (None: text only)."""
    if len(req.messages) > limits.max_messages:
        raise ApiError(400, f"the conversation has {len(req.messages)} messages, this server takes at most "
                       f"{limits.max_messages}: start a new conversation", "messages", "too_many_messages")
    if req.messages[-1].role != "user":
        raise ApiError(400, f"the last message is the {req.messages[-1].role}'s: end with the user's message",
                       f"messages[{len(req.messages) - 1}].role", "invalid_value")
    image_parts = [(i, j) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                   for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
    if len(image_parts) > 1:
        where = ", ".join(f"messages[{i}].content[{j}]" for i, j in image_parts)
        raise ApiError(400, too_many_images(len(image_parts), where), "messages", "too_many_images")
    messages, image = [], None
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        content = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        if not content:
            raise ApiError(400, f"messages[{i}] has no content: send text (or, for the user, an image)",
                           f"messages[{i}].content", "invalid_value")
        parts = []
        for j, p in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
                continue
            if role != "user":
                raise ApiError(400, f"{where}: only user messages may hold the image", where, "invalid_value")
            image = image_from_url(p.image_url.url, f"{where}.image_url", limits.max_image_pixels)
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    return messages, image


def prepare_turn(req: ChatCompletionRequest, count: PromptCounter, seq: int, served_name: str,
                 limits: Limits) -> PreparedTurn:
    """Blocking (the processor tokenizes, the image is decoded): run it in a worker thread."""
    if req.model != served_name:
        raise ApiError(404, f"model {req.model!r} is not served here: use {served_name!r} (GET /v1/models)",
                       "model", "model_not_found")
    _refuse_unsupported(req)
    sampling = sampling_of(req)
    stop = stops_of(req)
    messages, image = template_messages(req, limits)
    prompt_tokens = count(messages)
    room = seq - prompt_tokens
    if room < 1:
        # The answer needs one place of its own here: a request always gets at least one token.
        raise ApiError(400, f"{PromptTooLong(prompt_tokens, seq)} (prompt and answer together): shorten the "
                       "conversation", "messages", "context_length_exceeded")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if asked is not None and asked > room:
        raise ApiError(400, f"{name}={asked} does not fit: the model's sequence length {seq} leaves {room} tokens "
                       f"after this {prompt_tokens}-token prompt; ask for at most {room}", name, "invalid_value")
    max_new = asked if asked is not None else min(limits.default_max_tokens, room)
    return PreparedTurn(TurnRequest(messages, image, max_new, sampling, stop), prompt_tokens)
