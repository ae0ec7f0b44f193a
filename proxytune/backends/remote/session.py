"""A remote source's session: each row's token ids, stepped by asking the server about every row's sequence.

The server is stateless for us (it may reuse its prompt cache): the rows of a batch are in flight
concurrently (RemoteSource.map_rows), one call (max_tokens 1, logprobs k) per token per row.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Protocol, Sequence

import torch

from ...errors import ProxyTuneError, SourceFailure
from ..protocol import Capabilities
from .spec import RemoteOptions


class RowServer(Protocol):
    """What a remote session asks of its source (source.RemoteSource, which opens the sessions)."""

    options: RemoteOptions
    vocab_size: int

    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """[V] after ids. One call."""

    def after_each(self, ids: Sequence[int], first: int) -> list[torch.Tensor]:
        """[V] after ids[:t] for t = first .. len(ids)."""

    def continuation(self, ids: Sequence[int], width: int, temperature: float, seed: int
                     ) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        """The server's own continuation of ids, up to width tokens (drafting.Drafter)."""

    def map_rows(self, function: Callable, items: Sequence) -> list:
        """function over the rows of a batch, concurrently."""

    def count_tokens(self, n: int) -> None:
        """n more tokens were decided from this source's distributions."""


class RemoteSession:
    """Each row's token ids; every step asks the server about every row's full sequence.

    The server keeps no state for us, so joining, forking and rolling back only edit the local
    token lists: a remote base serves continuous batching and speculative verification as well as
    any local model.

    Generated tokens are counted for the source's stats: a one-token step's distributions decide a
    token each (taken back if the step is rewound); a wider span's decide what `rewind` keeps."""

    capabilities = Capabilities(rollback=True, join=True, fork=True)

    def __init__(self, source: RowServer, prompts: Sequence[Sequence[int]]):
        if any(len(p) == 0 for p in prompts):
            raise ProxyTuneError("cannot run an empty token sequence: every prompt needs at least one token")
        self.source = source
        # the server computes: a step of the local models can run while this one waits for its answer
        self.capabilities = replace(type(self).capabilities, place=frozenset({f"server {source.options.base_url}"}))
        self.rows = [list(p) for p in prompts]
        self.appended = 0
        self.counted = 0  # tokens of the current span already counted as generated

    def prefill(self) -> torch.Tensor:
        out = torch.stack(self.source.map_rows(self.source.next_logits, self.rows))
        self.source.count_tokens(len(self.rows))
        return out

    def _append(self, new: list[list[int]]) -> None:
        for row, appended in zip(self.rows, new):
            row.extend(int(t) for t in appended)

    def _take_back(self, width: int) -> None:
        for row in self.rows:
            del row[len(row) - width:]

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        new = tokens.reshape(tokens.shape[0], -1).tolist()
        if len(new) != len(self.rows):
            raise ValueError(f"advance got {len(new)} rows for a session of {len(self.rows)}")
        width = len(new[0])
        self._append(new)
        before, self.appended = self.appended, width + (self.appended if extend else 0)
        try:
            out = self._score_appended(width)
        except SourceFailure:  # nothing happened: the engine may retry without the refused rows
            self._take_back(width)
            self.appended = before
            raise
        if not extend:  # a new span; an ordinary step's distributions decide a token each
            self.counted = len(self.rows) if width == 1 else 0
            self.source.count_tokens(self.counted)
        return out

    def _score_appended(self, width: int) -> torch.Tensor:
        if width == 1:
            return torch.stack(self.source.map_rows(self.source.next_logits, self.rows))[:, None]
        if self.source.options.echo:  # one call scores the whole span
            per_row = self.source.map_rows(lambda row: self.source.after_each(row, len(row) - width + 1), self.rows)
        else:  # one call per position, positions of a row in sequence
            per_row = self.source.map_rows(
                lambda row: [self.source.next_logits(row[:len(row) - width + j + 1]) for j in range(width)], self.rows)
        return torch.stack([torch.stack(rows) for rows in per_row])

    def rewind(self, keep: Sequence[int]) -> None:
        if any(k < 0 or k > self.appended for k in keep):
            raise ValueError(f"rewind keeps 0..{self.appended} of the last tokens, got {list(keep)}")
        for row, kept in zip(self.rows, keep):
            del row[len(row) - self.appended + kept:]
        self.appended = 0
        self.source.count_tokens(sum(keep) - self.counted)  # the positions kept are the tokens decided
        self.counted = 0

    def select(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[r] for r in rows]
        self.counted = len(self.rows) if self.counted else 0  # a one-token step's count follows its rows

    def join(self, other: "RemoteSession") -> None:
        if other.source is not self.source:
            raise ValueError("only sessions of the same source can be joined")
        self.rows += [list(row) for row in other.rows]
        self.appended = self.counted = 0  # a rewind cannot reach back across a join

    def fork(self) -> "RemoteSession":
        twin = type(self)(self.source, self.rows)
        twin.appended = self.appended
        return twin
