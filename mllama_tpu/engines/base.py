"""The Engine interface: what the generation loop and the chat need from a backend.

Two engines implement it: the ONNX reference engine (onnxruntime over an export dir, on the CPU)
and the bmodel engine (the C++ `chat` module on a BM1684X or its simulator). Both take exactly
the same inputs (mllama_tpu.inputs), so a wrong answer can be located piece by piece.

Protocol of one turn: `encode_image` once per image (keeps the cross-attention states),
`prefill(p)` -> first token, then `decode(token)` -> next token until the caller stops; the
engine keeps position, KV cache and the decode-time masks itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from mllama_tpu.inputs import ImageInputs, PrefillInputs

GENERATION_MODES = ("greedy", "penalty_sample")


@dataclass
class SamplingParams:
    """How the next token is chosen. penalty_sample runs the on-model head (repeat penalty over
    the last repeat_last_n tokens, top-k, temperature, top-p) and the host draws from its probs."""

    mode: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repeat_penalty: float = 1.0
    repeat_last_n: int = 32
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError with a user-readable message on an impossible setting."""
        if self.mode not in GENERATION_MODES:
            raise ValueError(f"generation mode {self.mode!r} is not one of {', '.join(GENERATION_MODES)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 1:
            raise ValueError(f"repeat_last_n must be >= 1, got {self.repeat_last_n}")

    @property
    def effective_mode(self) -> str:
        # Temperature 0 is the limit of sampling: the most likely token, i.e. greedy.
        return "greedy" if self.temperature == 0 else self.mode


class Engine(ABC):
    """A loaded model that can see one image and generate tokens one at a time."""

    seq_length: int  # static sequence length SEQ (prompt + answer must fit)
    hidden_size: int
    vocab_size: int  # text vocabulary (logits width)
    max_tiles: int  # T
    num_patches: int  # P, per tile incl. CLS
    eos_token_ids: list[int]  # from the export manifest; the chat adds the tokenizer's own
    image_token_id: int | None

    @abstractmethod
    def encode_image(self, image: ImageInputs) -> None:
        """Run the vision encoder once and keep its cross-attention states for later prefills."""

    @abstractmethod
    def clear_image(self) -> None:
        """Forget the current image; later prompts must be text-only until a new encode_image."""

    @abstractmethod
    def prefill(self, p: PrefillInputs) -> int:
        """Run the whole prompt, fill the KV cache, return the first generated token."""

    @abstractmethod
    def decode(self, token: int) -> int:
        """Feed the previous token at the next position, return the token after it."""

    def set_sampling(
        self,
        mode: str = "greedy",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 32,
        seed: int | None = None,
    ) -> None:
        """Choose greedy or penalty sampling for the following tokens (seed resets the RNG)."""
        params = SamplingParams(mode, temperature, top_p, top_k, repeat_penalty, repeat_last_n, seed)
        params.validate()
        self.sampling = params
        self._apply_sampling(params)

    @abstractmethod
    def _apply_sampling(self, params: SamplingParams) -> None:
        """Hand validated sampling settings to the engine's token choice."""

    def close(self) -> None:
        """Release what the engine holds (device memory, sessions); idempotent."""


def draw_token(probs: np.ndarray, tokens: np.ndarray, top_k: int, rng: np.random.Generator) -> int:
    """Host side of penalty sampling: the head gives the top-K candidates (best first) and their
    probabilities; keep the user's top_k of them and draw one."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[top_k:] = 0.0
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        return int(tokens[0])
    return int(tokens[rng.choice(len(p), p=p / total)])
