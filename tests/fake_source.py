"""A logit source with no model behind it: each row's logits are a fixed function of its own tokens, so a
row's output can be known without the engine, and thousands of steps take seconds (tests of batching)."""
from __future__ import annotations

from typing import Sequence

import torch

from proxytune.backends.protocol import Capabilities


def row_logits(tokens: Sequence[int], seed: int, vocab_size: int) -> torch.Tensor:
    """The next-token logits after `tokens`: depends on the last three tokens and the length only."""
    phase = (sum((i + 1) * t for i, t in enumerate(tokens[-3:])) * 7919 + len(tokens) * 104729 + seed) % 1000
    return torch.sin(torch.arange(vocab_size, dtype=torch.float32) * (0.37 + phase / 997) + phase) * 4


class FakeSession:
    capabilities = Capabilities(rollback=True, join=True, fork=True)

    def __init__(self, source: "FakeSource", rows: list[list[int]]):
        self.source, self.rows = source, rows
        self.span = [len(row) for row in rows]  # where the last advance span starts, per row

    def _logits(self, prefixes) -> torch.Tensor:
        return torch.stack([row_logits(p, self.source.seed, self.source.vocab_size) for p in prefixes])

    def prefill(self) -> torch.Tensor:
        return self._logits(self.rows)

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        if tokens.shape[0] != len(self.rows):
            raise ValueError(f"advance got {tokens.shape[0]} rows for a session of {len(self.rows)}")
        if not extend:
            self.span = [len(row) for row in self.rows]
        out = []
        for j in range(tokens.shape[1]):
            for row, token in zip(self.rows, tokens[:, j].tolist()):
                row.append(token)
            out.append(self._logits(self.rows))
        return torch.stack(out, dim=1)

    def rewind(self, keep: Sequence[int]) -> None:
        for i, k in enumerate(keep):
            del self.rows[i][self.span[i] + k:]

    def select(self, rows: Sequence[int]) -> None:
        self.rows, self.span = [self.rows[r] for r in rows], [self.span[r] for r in rows]

    def join(self, other: "FakeSession") -> None:
        self.rows += other.rows
        self.span += other.span

    def fork(self, rows: Sequence[int] | None = None) -> "FakeSession":
        twin = FakeSession(self.source, [list(self.rows[r]) for r in (rows if rows is not None else
                                                                       range(len(self.rows)))])
        twin.span = [self.span[r] for r in (rows if rows is not None else range(len(self.rows)))]
        return twin


class FakeSource:
    max_length = None
    eos_token_ids: frozenset[int] = frozenset()  # its text ends where its role's tokenizer says
    distribution = "full"
    server_calls = None

    def __init__(self, seed: int, vocab_size: int, name: str = "fake"):
        self.seed, self.vocab_size, self.name = seed, vocab_size, f"{name}-{seed}"
        self.opened = 0

    def open(self, prompts: Sequence[Sequence[int]]) -> FakeSession:
        self.opened += 1
        return FakeSession(self, [list(p) for p in prompts])

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [torch.stack([row_logits(s[:i + 1], self.seed, self.vocab_size) for i in range(len(s))])
                for s in sequences]


def fake_trio(vocab_size: int) -> tuple[FakeSource, FakeSource, FakeSource]:
    return FakeSource(11, vocab_size, "base"), FakeSource(23, vocab_size, "expert"), FakeSource(37, vocab_size, "anti")


