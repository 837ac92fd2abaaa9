"""The Engine interface: what the generation loop and the session need from a backend.

Two engines implement it: the ONNX reference engine (onnxruntime over an export dir, on the CPU)
and the bmodel engine (the C++ `chat` module on a BM1684X or its simulator). Both take exactly
the same inputs (mllama_tpu.inputs), so a wrong answer can be located piece by piece.

Protocol of one turn: `encode_image` once per image (keeps its cross-attention K/V),
`prefill(p)` -> first token, then `decode(token)` -> next token until the caller stops. What is
the same for every backend is done here once: which leading tokens the KV cache already holds
(engines.cache) and the chunks that prefill the rest, the ids seen so far (the repeat penalty's
window), the sampling head's inputs, the host's draw, and the guard against a full cache. A
backend only runs its nets (`_prefill_chunk`, `_decode`) and keeps position and KV cache.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllama_tpu.engines.cache import CachedTokens
from mllama_tpu.inputs import ChunkInputs, ImageInputs, PrefillInputs
from mllama_tpu.sampling import SampleHeadInputs, SamplingParams, draw_token, sample_head_inputs


@dataclass
class Finish:
    """What the last chunk of a prompt does besides its layers: the token head, and the cross
    rows every decode step of this prompt reads (image prompts)."""

    head: SampleHeadInputs | None  # None: greedy
    decode_cross_attention_mask: np.ndarray | None
    decode_text_row_mask: np.ndarray | None


class Engine(ABC):
    """A loaded model that can see one image and generate tokens one at a time."""

    model_dir: Path  # where the model's files are (export dir, or the bmodel's dir)
    seq_length: int  # static sequence length SEQ (prompt + answer must fit)
    hidden_size: int
    vocab_size: int  # text vocabulary (logits width)
    max_tiles: int  # T
    num_patches: int  # P, per tile incl. CLS
    recent_window: int  # R: ids the penalty_sample_head's repeat penalty takes
    prefill_lengths: tuple[int, ...]  # chunk lengths of the step nets (1, decode's, not included)

    def __init__(self) -> None:
        self.sampling = SamplingParams()
        self._rng = np.random.default_rng()
        self._seen: list[int] = []  # prompt + fed tokens of the current turn
        self.cached = CachedTokens()
        self.reuse_cache = True  # False: every prompt runs whole (the benchmark's "before")
        self.last_reused = 0  # prompt tokens the last prefill found in the cache
        self._images_encoded = 0
        self._image: int | None = None  # which encoded image the cross K/V are of
        self._decode_row = None  # tiles a decoded token sees (the last prompt token's)

    # -- the protocol ---------------------------------------------------------------------------

    def encode_image(self, image: ImageInputs) -> None:
        """Run the vision encoder and the cross K/V projections once; later prefills read them."""
        if image.pixel_values.shape[0] != self.max_tiles:
            raise ValueError(f"image has {image.pixel_values.shape[0]} tile slots, the model takes {self.max_tiles}")
        self._image = None
        self._encode_image(image)
        self._images_encoded += 1
        self._image = self._images_encoded

    def clear_image(self) -> None:
        """Forget the current image; later prompts must be text-only until a new encode_image."""
        self._image = None

    def prefill(self, p: PrefillInputs) -> int:
        """Run the prompt's tokens the cache does not hold yet, return the first generated token."""
        if p.seq_length != self.seq_length:
            raise ValueError(f"prefill inputs have SEQ {p.seq_length}, the model {self.seq_length}")
        if p.has_image and self._image is None:
            raise RuntimeError("an image prompt needs encode_image() first")
        image = self._image if p.has_image else None
        rows = p.row_keys
        start = self.cached.reusable(rows, image) if self.reuse_cache else 0
        self.cached.forget()  # until this prefill completes
        self._seen = p.token_ids
        finish = Finish(self._head_inputs(), p.decode_cross_attention_mask, p.decode_text_row_mask)
        chunks = p.chunks(start, self.prefill_lengths)
        for i, chunk in enumerate(chunks):
            out = self._prefill_chunk(chunk, finish if i == len(chunks) - 1 else None)
        self.cached.filled(rows, image)
        self._decode_row = p.decode_row_key
        self.last_reused = start
        return self._choose(out)

    def decode(self, token: int) -> int:
        """Feed the previous token at the next position, return the token after it."""
        if self.is_full:
            raise RuntimeError(f"the KV cache is full ({self.seq_length} tokens): start a new prompt")
        if not self._seen:
            raise RuntimeError("decode before prefill: call prefill first")
        self._seen.append(int(token))
        try:
            out = self._decode(int(token), self._head_inputs())
        except BaseException:
            self.cached.forget()  # a half-run step: the cache's last slot is unknown
            raise
        self.cached.appended((int(token), self._decode_row))
        return self._choose(out)

    @property
    @abstractmethod
    def position(self) -> int:
        """Cache slot the next fed token occupies (= tokens in the cache)."""

    @property
    def is_full(self) -> bool:
        return self.position >= self.seq_length

    def set_sampling(self, params: SamplingParams) -> None:
        """Greedy or penalty sampling for the following tokens; the draw is seeded by params.seed."""
        self.sampling = params
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
    def _encode_image(self, image: ImageInputs) -> None:
        """The vit, then every cross layer's K/V from its states, kept for later prefills."""

    @abstractmethod
    def _prefill_chunk(self, chunk: ChunkInputs, finish: Finish | None):
        """Run one chunk's nets against the cache (slots before chunk.offset), cache its rows.
        The last chunk (`finish` given) also runs the token heads on its last real row and keeps
        the decode cross rows; it returns greedy_head's token (finish.head None), else
        penalty_sample_head's K candidates (probs, tokens) for the host to draw from."""

    @abstractmethod
    def _decode(self, token: int, head: SampleHeadInputs | None):
        """One decode step's nets (the cross rows are those the last prompt's `finish` kept);
        returns as _prefill_chunk."""

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
