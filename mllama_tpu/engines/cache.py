"""What an engine's KV cache holds, so a new prompt prefills only what is not already there
(ARCHITECTURE.md, "Prefill in chunks").

A cached token's self-attention K/V depend on every token up to it, on the tiles each of them
sees and, in an image prompt, on the image (every row of a cross-attention layer reads it,
even rows before <|image|>). So a new prompt may keep the longest run of leading slots whose
(id, tiles seen) match, and only if it has the same image, or none like the cache. The last
prompt token is always run again: its hidden state is what the first answer token comes from.
"""
from __future__ import annotations

from typing import Hashable


class CachedTokens:
    """The (id, tiles seen) of every filled cache slot and the image they were computed with."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.image: Hashable | None = None  # which encoded image; None: text-only

    def reusable(self, rows: list[tuple], image: Hashable | None) -> int:
        """Leading slots a prompt of these rows, seeing `image`, can keep."""
        if image != self.image:
            return 0
        n = 0
        for cached, new in zip(self.rows, rows):
            if cached != new:
                break
            n += 1
        return min(n, len(rows) - 1)

    def filled(self, rows: list[tuple], image: Hashable | None) -> None:
        """A prefill wrote these rows (all of the prompt's) with this image."""
        self.rows, self.image = list(rows), image

    def appended(self, row: tuple) -> None:
        """A decode step wrote one more slot."""
        self.rows.append(row)

    def forget(self) -> None:
        """Nothing in the cache can be trusted (a failed step, another image)."""
        self.rows, self.image = [], None

    def __len__(self) -> int:
        return len(self.rows)
