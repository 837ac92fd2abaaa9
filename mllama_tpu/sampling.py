"""How the next token is chosen: the settings, their defaults and checks, and the host's part.

Both engines run the same on-model heads (greedy_head, penalty_sample_head); everything the host
adds around them lives here once: the validated settings, the window of recent ids the repeat
penalty sees, and the final seeded draw among the head's K candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllama_tpu.errors import UserError

GENERATION_MODES = ("greedy", "penalty_sample")


@dataclass(frozen=True)
class SamplingParams:
    """penalty_sample: repeat penalty over the last repeat_last_n ids, top-k, temperature, top-p
    on the model's head, then a seeded draw on the host. Temperature 0 means greedy. An impossible
    setting cannot be built: the constructor raises a UserError saying which, so the CLI, the
    session, the server and the engines all refuse it in these words, once."""

    mode: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repeat_penalty: float = 1.0
    repeat_last_n: int = 32
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in GENERATION_MODES:
            raise UserError(f"generation mode {self.mode!r} is not one of {', '.join(GENERATION_MODES)}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")
        if not self.repeat_penalty > 0:
            raise UserError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise UserError(f"repeat_last_n must be >= 0 (0: no repeat penalty), got {self.repeat_last_n}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"seed must be in 0..2**63-1, got {self.seed}")

    @property
    def sample(self) -> bool:
        """False: the greedy head picks the token (temperature 0 is the limit of sampling)."""
        return self.mode == "penalty_sample" and self.temperature > 0


@dataclass(frozen=True)
class SampleHeadInputs:
    """The penalty_sample_head's inputs besides the logits."""

    recent_ids: np.ndarray  # [1,R] i32
    top_p: np.ndarray  # [1] f32
    temperature: np.ndarray  # [1] f32
    repeat_penalty: np.ndarray  # [1] f32


def sample_head_inputs(params: SamplingParams, seen: list[int], window: int) -> SampleHeadInputs:
    """The last repeat_last_n ids seen (prompt + answer), padded in front to the head's fixed
    window by repeating the oldest: a repeated id is penalised once, so padding changes nothing.
    No id wanted: penalty 1, which changes nothing either."""
    take = min(params.repeat_last_n, window, len(seen))
    recent = list(seen[len(seen) - take:]) if take else [seen[-1] if seen else 0]
    padded = [recent[0]] * (window - len(recent)) + recent
    penalty = params.repeat_penalty if take else 1.0
    f32 = np.float32
    return SampleHeadInputs(np.array([padded], np.int32), np.array([params.top_p], f32),
                            np.array([params.temperature], f32), np.array([penalty], f32))


def draw_token(probs: np.ndarray, tokens: np.ndarray, top_k: int, rng: np.random.Generator) -> int:
    """The head gives K candidates (best first, already top-p filtered) and their probabilities;
    keep the user's top_k of them (more than K means all) and draw one."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1).copy()
    tokens = np.asarray(tokens).reshape(-1)
    p[top_k:] = 0.0
    p = np.maximum(p, 0.0)
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        return int(tokens[0])
    return int(tokens[rng.choice(len(p), p=p / total)])
