"""The Engine interface: what the generation loop and the session need from a backend.

Two engines implement it: the ONNX reference engine (onnxruntime over an export dir, on the CPU)
and the bmodel engine (the C++ `chat` module on a BM1684X or its simulator). Both take exactly
the same inputs (mllama_tpu.inputs), so a wrong answer can be located piece by piece.

Protocol of one turn: `encode_image` once per image (keeps the cross-attention states),
`prefill(p)` -> first token, then `decode(token)` -> next token until the caller stops. What is
the same for every backend is done here once: the ids seen so far (the repeat penalty's window),
the sampling head's inputs, the host's draw, and the guard against a full cache. A backend
only runs its nets (`_prefill`, `_decode`) and keeps position and KV cache.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from mllama_tpu.inputs import ImageInputs, PrefillInputs
from mllama_tpu.sampling import SampleHeadInputs, SamplingParams, draw_token, sample_head_inputs


class Engine(ABC):
    """A loaded model that can see one image and generate tokens one at a time."""

    model_dir: Path  # where the model's files are (export dir, or the bmodel's dir)
    seq_length: int  # static sequence length SEQ (prompt + answer must fit)
    hidden_size: int
    vocab_size: int  # text vocabulary (logits width)
    max_tiles: int  # T
    num_patches: int  # P, per tile incl. CLS
    recent_window: int  # R: ids the penalty_sample_head's repeat penalty takes

    def __init__(self) -> None:
        self.sampling = SamplingParams()
        self._rng = np.random.default_rng()
        self._seen: list[int] = []  # prompt + fed tokens of the current turn

    # -- the protocol ---------------------------------------------------------------------------

    @abstractmethod
    def encode_image(self, image: ImageInputs) -> None:
        """Run the vision encoder once and keep its cross-attention states for later prefills."""

    @abstractmethod
    def clear_image(self) -> None:
        """Forget the current image; later prompts must be text-only until a new encode_image."""

    def prefill(self, p: PrefillInputs) -> int:
        """Run the whole prompt, fill the KV cache, return the first generated token."""
        if p.seq_length != self.seq_length:
            raise ValueError(f"prefill inputs have SEQ {p.seq_length}, the model {self.seq_length}")
        self._seen = p.token_ids
        return self._choose(self._prefill(p, self._head_inputs()))

    def decode(self, token: int) -> int:
        """Feed the previous token at the next position, return the token after it."""
        if self.is_full:
            raise RuntimeError(f"the KV cache is full ({self.seq_length} tokens): start a new prompt")
        if not self._seen:
            raise RuntimeError("decode before prefill: call prefill first")
        self._seen.append(int(token))
        return self._choose(self._decode(int(token), self._head_inputs()))

    @property
    @abstractmethod
    def position(self) -> int:
        """Cache slot the next fed token occupies (= tokens in the cache)."""

    @property
    def is_full(self) -> bool:
        return self.position >= self.seq_length

    def set_sampling(self, params: SamplingParams) -> None:
        """Greedy or penalty sampling for the following tokens; the draw is seeded by params.seed."""
        self.sampling = params.validated()
        self._rng = np.random.default_rng(params.seed)

    @property
    def memory(self) -> dict[str, int]:
        """Device memory now: `engine_bytes` the engine allocated itself (+ `device_used_mb`,
        `device_total_mb` where the driver reports them); empty for a backend without a device.
        Not thread-safe against a running turn: ask from the thread that runs the engine."""
        return {}

    def close(self) -> None:
        """Release what the engine holds (device memory, sessions); idempotent."""

    # -- what a backend implements ----------------------------------------------------------------

    @abstractmethod
    def _prefill(self, p: PrefillInputs, head: SampleHeadInputs | None):
        """Run the prompt's nets. Returns greedy_head's token (head None), else penalty_sample_head's
        K candidates (probs, tokens) for the host to draw from."""

    @abstractmethod
    def _decode(self, token: int, head: SampleHeadInputs | None):
        """One decode step's nets; returns as _prefill."""

    # -- shared token choice ----------------------------------------------------------------------

    def _head_inputs(self) -> SampleHeadInputs | None:
        if not self.sampling.sample:
            return None
        return sample_head_inputs(self.sampling, self._seen, self.recent_window)

    def _choose(self, out) -> int:
        if isinstance(out, tuple):
            probs, tokens = out
            return draw_token(probs, tokens, self.sampling.top_k, self._rng)
        return int(out)
