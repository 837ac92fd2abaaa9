"""The generation loop: prefill, then decode one token at a time until a stop condition.

It knows nothing of how the model is stored: any engines.base.Engine works. The stop rules live
here and only here: an EOS id, max_new_tokens, the static sequence length SEQ full (reported,
not silent), or the caller's own reason when it stops iterating (a stop string, a cancel).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

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

    def stop(self, reason: str) -> None:
        """The caller ended the answer early (a stop string, a cancel)."""
        self.stop_reason = reason

    @property
    def tps(self) -> float:
        """Decode speed in tokens/s: tokens after the first over the time they took."""
        produced = self.num_generated - 1
        return produced / self.decode_s if produced > 0 and self.decode_s > 0 else 0.0

    @property
    def num_generated(self) -> int:
        """Tokens the model produced, a final EOS included."""
        return len(self.tokens) + (1 if self.stop_reason == STOP_EOS else 0)


def generate_tokens(engine: Engine, prompt: PrefillInputs, eos_ids: Iterable[int], max_new_tokens: int,
                    out: Generation) -> Iterator[int]:
    """Yield each answer token as it comes (an EOS ends the answer and is not yielded); `out`
    records tokens, times and why it stopped. A caller that stops early calls out.stop(reason).
    max_new_tokens >= 1: the session checks it (session.check_max_new_tokens)."""
    eos = set(int(t) for t in eos_ids)
    t0 = time.perf_counter()
    token = engine.prefill(prompt)
    t1 = time.perf_counter()
    out.ftl_s = t1 - t0
    try:
        while True:
            if token in eos:
                out.stop_reason = STOP_EOS
                return
            out.tokens.append(token)
            yield token
            if len(out.tokens) >= max_new_tokens:
                out.stop_reason = STOP_MAX_NEW_TOKENS
                return
            if engine.is_full:
                out.stop_reason = STOP_SEQLEN
                return
            token = engine.decode(token)
    finally:
        out.decode_s = time.perf_counter() - t1


def generate(engine: Engine, prompt: PrefillInputs, eos_ids: Iterable[int], max_new_tokens: int) -> Generation:
    """The whole answer at once."""
    out = Generation()
    for _ in generate_tokens(engine, prompt, eos_ids, max_new_tokens, out):
        pass
    return out
