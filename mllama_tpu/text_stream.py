"""Token ids -> text pieces as they come: never half a UTF-8 character, never part of a stop string."""
from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """A byte-level tokenizer may emit part of a multi-byte character; decoding it alone gives
    U+FFFD. The held-back tail is released once the following tokens complete it (or at the end).

    With stop strings, text that could still turn into one is held back too; once one appears,
    `stopped` is set and nothing from it on is ever handed out.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._text()
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # maybe an incomplete character: wait for the next token
        return self._release(text, end, final=False)

    def flush(self) -> str:
        text = self._text()
        return self._release(text, len(text), final=True)

    def _release(self, text: str, end: int, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            # Only a stop string that ends in the new text can be new; searching from just
            # before what was handed out finds one that straddles the boundary.
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1 and at < end:
                end = min(end, at)
                self.stopped = True
        if not self.stopped and not final:
            end = min(end, self._safe_end(text, end))
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def _safe_end(self, text: str, end: int) -> int:
        """Where the text may be cut without handing out the start of a stop string."""
        safe = end
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    safe = min(safe, end - k)
                    break
        return safe

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
