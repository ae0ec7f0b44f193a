"""Per-row text bookkeeping: incremental detokenisation, stop strings, and what is safe to stream."""
from __future__ import annotations

from typing import Sequence


class TextTracker:
    """Decodes a row's generated tokens and finds stop strings in the decoded text.

    Streaming holds back a trailing partial UTF-8 character and any tail that could still grow into
    a stop string, so a stop string is never shown and then taken back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.emitted = 0
        self._searched = 0

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self._searched - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
            self._searched = len(self.text)

    def _safe_end(self) -> int:
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                if self.text[end - n:end] == stop[:n]:
                    return end - n
        return end

    def delta(self, final: bool = False) -> str:
        """New text since the last call; `final` flushes everything (the row has finished)."""
        end = len(self.text) if final else self._safe_end()
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
