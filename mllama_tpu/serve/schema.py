"""The OpenAI Chat Completions wire format, as far as this server speaks it.

Requests are validated here for shape and ranges (a mismatch is a 422 naming the field);
what depends on the model (the image, the prompt's length, max_tokens against SEQ) is checked
in conversation.py. Clients send many optional fields this server does not know: unknown ones
are ignored, known ones it cannot honour are refused there (better than a silently wrong answer).
Responses carry one extension, `timings` (as llama.cpp's server does): queue wait, first-token
latency and decode speed of the turn, which the chat page shows under each answer.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------------------------------
# request
# ---------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL, e.g. data:image/png;base64,... (no remote or local URLs)")
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="answer tokens at most; <= what SEQ leaves after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (preferred when both)")
    temperature: float | None = Field(None, ge=0, le=2, description="absent or 0: greedy; > 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="extension: candidates kept when sampling (default 50)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the answer ends before the first")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="mapped onto the model's repeat penalty: repeat_penalty = 2 ** (frequency_penalty / 2)"
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float = Field(description="time the request waited for a free engine")
    ftl_s: float = Field(description="first-token latency: the prefill (and the image's vision encoder)")
    tps: float = Field(description="decode speed, tokens per second after the first")
    engine: int = Field(description="index of the engine (device) that answered")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: Timings


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mllama-tpu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    engines: int
    busy: int
    queued: int
    memory: list[dict[str, int]] = Field(default_factory=list, description=(
        "per engine, as its worker read it after its last turn: engine_bytes (device memory the engine "
        "allocated; constant once every net has run, so growth is a leak), device_used_mb and "
        "device_total_mb where the driver reports them (a chip); empty for the onnx backend"))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
