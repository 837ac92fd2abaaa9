"""The generation loop: prefill, then decode one token at a time until a stop condition.

It knows nothing of how the model is stored: any base.Engine works. Stops on an EOS id, after
max_new_tokens, or when the static sequence length SEQ is full (reported, not silent).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from mllama_tpu.engines.base import Engine
from mllama_tpu.inputs import PrefillInputs

STOP_EOS = "eos"
STOP_MAX_NEW_TOKENS = "max_new_tokens"
STOP_SEQLEN = "seqlen"


@dataclass
class Generation:
    """One answer: its tokens (without the final EOS) and how fast they came."""

    tokens: list[int] = field(default_factory=list)
    stop_reason: str = STOP_EOS
    ftl_s: float = 0.0  # first token latency: the prefill
    decode_s: float = 0.0  # time spent producing the tokens after the first

    @property
    def tps(self) -> float:
        """Decode speed in tokens/s: tokens after the first over the time they took."""
        produced = self.num_generated - 1
        return produced / self.decode_s if produced > 0 and self.decode_s > 0 else 0.0

    @property
    def num_generated(self) -> int:
        """Tokens the model produced, a final EOS included."""
        return len(self.tokens) + (1 if self.stop_reason == STOP_EOS else 0)


def generate(
    engine: Engine,
    prompt: PrefillInputs,
    eos_ids: Iterable[int],
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Generate up to max_new_tokens tokens after `prompt`; on_token sees each non-EOS token."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = set(int(t) for t in eos_ids)
    out = Generation()

    t0 = time.perf_counter()
    token = engine.prefill(prompt)
    t1 = time.perf_counter()
    out.ftl_s = t1 - t0
    position = prompt.num_tokens  # where `token` goes when it is fed back

    while True:
        if token in eos:
            out.stop_reason = STOP_EOS
            break
        out.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(out.tokens) >= max_new_tokens:
            out.stop_reason = STOP_MAX_NEW_TOKENS
            break
        if position >= engine.seq_length:
            out.stop_reason = STOP_SEQLEN
            break
        token = engine.decode(token)
        position += 1
    out.decode_s = time.perf_counter() - t1
    return out
