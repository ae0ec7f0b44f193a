"""What the decoder needs from a model: next-token logits for a batch of token sequences.

A *logit source* is a model (local transformers, llama.cpp, a remote server). It opens a
*session* over a batch of prompts and from then on only ever sees token ids. The decoder never
knows which kind of source it is talking to; roles (base / expert / anti-expert) are data.

What a session can do beyond plain stepping is *declared* in its `capabilities`, never probed:
the engine reads them to decide whether rows may join a running batch (continuous batching) and
whether a source can draft for speculative decoding, and refuses up front what a session cannot do.

Logits are float32 tensors on the CPU or the source's device, with exactly `vocab_size` columns
(padded embedding rows already cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class Capabilities:
    """What a session supports besides prefill / one-token advance / select."""
    rollback: bool = False  # advance(..., extend=True) spans several calls and one rewind() reaches back over all
    join: bool = False  # join(other): the rows of another prefilled session of the same source move in
    fork: bool = False  # fork(): an independent copy of the session (needed when a join splits shared roles)


@runtime_checkable
class Session(Protocol):
    """The decoding state of one source over a batch of rows (its KV caches, masks, positions)."""

    capabilities: ClassVar[Capabilities]

    def prefill(self) -> torch.Tensor:
        """Run the prompts; return the next-token logits of every row, shape [B, V]."""

    def advance(self, tokens: torch.Tensor, extend: bool = False) -> torch.Tensor:
        """Append `tokens` [B, k] to every row; return the logits after each of them, [B, k, V].

        k = 1 is one ordinary decoding step; k > 1 scores a speculative draft in one forward.
        `extend=True` (sessions with `capabilities.rollback`): these tokens join the previous
        advance's span, so one `rewind` can drop tokens appended over several calls.
        """

    def rewind(self, keep: Sequence[int]) -> None:
        """Undo the tail of the last advance span: row i keeps only its first keep[i] appended tokens.

        Exact: later logits equal those of a session that never saw the dropped tokens.
        """

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (finished rows leave the batch), in this order."""

    def join(self, other: "Session") -> None:
        """(capabilities.join) Append the rows of `other`, prefilled on the same source, after these rows."""

    def fork(self) -> "Session":
        """(capabilities.fork) An independent copy that can advance on its own."""


@runtime_checkable
class LogitSource(Protocol):
    """A model that gives next-token logits."""

    name: str
    vocab_size: int  # logit columns after cutting padded rows
    max_length: int | None  # context length in tokens, None when unknown

    def open(self, prompts: Sequence[Sequence[int]]) -> Session:
        """Start a session over a batch of tokenized prompts (nothing is computed yet)."""

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Scoring mode: for each sequence of length L, logits [L, V]; row t predicts token t + 1."""
