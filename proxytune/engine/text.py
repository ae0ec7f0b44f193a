"""Per-row text: incremental detokenisation, stop strings, and what is safe to stream.

Decoding the whole output again at every token is quadratic in its length. Instead each new token is
decoded together with a few tokens before it (`prefix_offset` .. end) and the text they already gave
(`prefix_offset` .. `read_offset`) is subtracted: tokenizers that drop a leading space or merge bytes
across tokens (SentencePiece, byte-level BPE) then give exactly the characters the new token adds.
While the window ends in an unfinished UTF-8 character ("\\ufffd") nothing is released.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing token sequence, one token at a time, each step costing a few tokens' decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The characters this token completes ("" while a character is still unfinished)."""
        self.token_ids.append(token_id)
        before = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.token_ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still pending, unfinished characters included (the row has ended)."""
        before = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return after[len(before):] if len(after) > len(before) else ""


class TextTracker:
    """A row's generated text and its stop strings.

    Streaming holds back any tail that could still grow into a stop string, so a stop string is
    never shown and then taken back. A stop string is searched for only where new text could
    complete it: each token costs its own characters plus the longest stop string, whatever the
    output's length.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self.longest_stop = max(map(len, self.stop), default=0)
        self.text = ""
        self.stopped = False
        self.emitted = 0

    @property
    def token_ids(self) -> list[int]:
        return self.detokenizer.token_ids

    def add(self, token_id: int) -> None:
        self._append(self.detokenizer.add(token_id))

    def _append(self, piece: str) -> None:
        if not piece or self.stopped:
            return
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def _safe_end(self) -> int:
        """The end of the text that no stop string can still claim: the longest tail that begins a stop
        string, over all of them, is held back."""
        end = safe = len(self.text)
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                if self.text[end - n:end] == stop[:n]:
                    safe = min(safe, end - n)
                    break
        return safe

    def delta(self, final: bool = False) -> str:
        """New text since the last call; `final` flushes everything (the row has finished)."""
        if final:
            self._append(self.detokenizer.flush())
        end = len(self.text) if final else self._safe_end()
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
