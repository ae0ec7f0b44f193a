"""What the decoder needs from a model: next-token logits for a batch of token sequences.

A *logit source* is a model (local transformers, llama.cpp, a remote server). It opens a
*session* over a batch of prompts and from then on only ever sees token ids. The decoder never
knows which kind of source it is talking to; roles (base / expert / anti-expert) are data.

What a source is, it *declares*: its end-of-text ids, whether its logits cover the whole vocabulary
(`distribution`), and whether a server computes them (`server_calls`); callers read these, never the
source's type. What a session can do beyond plain stepping is *declared* in its `capabilities`, never probed:
the engine reads them to decide whether rows may join a running batch (continuous batching) and
whether a source can draft for speculative decoding, whether the base can draft its own continuation
(chunked decoding of a remote base), and refuses up front what a session cannot do.

Logits are float32 tensors on the CPU or the source's device, with exactly `vocab_size` columns
(padded embedding rows already cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class Capabilities:
    """What a session supports besides prefill / one-token advance / select."""
    rollback: bool = False  # advance(..., extend=True) spans several calls and one rewind() reaches back over all
    join: bool = False  # join(other): the rows of another prefilled session of the same source move in
    fork: bool = False  # fork(): an independent copy of the session (needed when a join splits shared roles)
    gather: bool = False  # gather(parts): rows of several sessions of one source copied into a new one at once
    draft: bool = False  # draft(): the model continues each row itself, several tokens in one call (a remote base)
    must_write: bool = False  # the session can only advance by what its model can write (a byte view): what it
    #                           rules out (−inf) must be ruled out of the combined distribution
    place: frozenset[str] | None = None  # the hardware its steps run on ({"cuda:0", "cuda:1"}, {"cpu"}, a server):
    #                           sessions whose places are known and disjoint run a step concurrently; None: unknown,
    #                           shared with every other session (one after another)


@dataclass
class Draft:
    """A drafting session's own continuation of each row, and its distribution before every drafted token.

    Position j of a row holds the distribution that predicts tokens[:, j]; it is *usable* when it is
    exactly what a one-token step after the same tokens would have returned. Positions past a row's
    `usable` count (the server drafted fewer tokens, a drafted token has no exact local id, its text
    would re-tokenise differently) carry no promise and must not be used.
    """
    fed: torch.Tensor  # [B, n]: what the session appended (the fed token, then drafts; 0 as padding): advance the others by it
    tokens: torch.Tensor  # [B, n]: drafted ids, -1 where a drafted token has no local id or the row has no draft
    logits: torch.Tensor  # [B, n, V]: row j predicts tokens[:, j]
    usable: list[int]  # per row, leading positions that are exact (>= 1)
    q: list[torch.Tensor | None]  # per row: [n, V] the distribution each draft was drawn from; None: the model's greedy choice


@runtime_checkable
class Session(Protocol):
    """The decoding state of one source over a batch of rows (its KV caches, masks, positions)."""

    capabilities: Capabilities  # on the class, or on the instance when it depends on the model (its place)

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

    def fork(self, rows: Sequence[int] | None = None) -> "Session":
        """(capabilities.fork) An independent copy that can advance on its own; `rows`: a copy of these
        rows only, in this order (a row may repeat: the byte-level view branches a row's token paths)."""

    def gather(self, parts: Sequence[tuple["Session", Sequence[int]]]) -> "Session":
        """(capabilities.gather) A new session holding, in order, the given rows of these sessions of this
        session's source (self among them or not), each row's state copied once: what forking each part and
        joining the copies gives, without the intermediate copies."""

    chunk: int | None  # (capabilities.draft) tokens per draft the session was configured with; None: the caller's choice

    def draft(self, tokens: torch.Tensor, widths: Sequence[int], temperatures: Sequence[float],
              seeds: Sequence[int]) -> Draft:
        """(capabilities.draft) Append `tokens` [B, 1]; let the model continue row i by up to widths[i]
        tokens of its own (temperature 0: its greedy choice; seeds make its sampling reproducible) and
        return them with the distribution before each. The appended span is `Draft.fed`, of width
        max(widths), so `rewind` keeps what the caller accepted (the fed token counts as one)."""


Distribution = Literal["full", "top_k"]


class CallStats(Protocol):
    """What the calls of a source behind a server have cost so far (backends/remote/stats.py: RemoteStats)."""

    calls: int  # HTTP requests answered, retries included
    tokens: int  # tokens decided from its distributions

    def summary(self, role: str) -> str:
        """One line for a person: calls, tokens per call, bytes, wall time, what the mapping dropped."""


@runtime_checkable
class LogitSource(Protocol):
    """A model that gives next-token logits."""

    name: str
    vocab_size: int  # logit columns after cutting padded rows
    max_length: int | None  # context length in tokens, None when unknown
    eos_token_ids: frozenset[int]  # the ids that end its text, as the model itself says (generation config, GGUF
    #                                metadata, the tokenizer it was built with); a role's tokenizer may name more
    distribution: Distribution  # "full": every column is the model's logit; "top_k": only the candidates a
    #                             server returned are finite, the rest −inf (unknown, not impossible)
    server_calls: CallStats | None  # a source computed by a server: its calls so far; None: computed here

    def open(self, prompts: Sequence[Sequence[int]]) -> Session:
        """Start a session over a batch of tokenized prompts (nothing is computed yet)."""

    def sequence_logits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Scoring mode: for each sequence of length L, logits [L, V]; row t predicts token t + 1."""


def copy_rows(parts: Sequence[tuple[Session, Sequence[int]]]) -> Session:
    """One new session holding these rows of these sessions (one source), in order. Sessions that declare
    `gather` copy each row once; the others fork each part and join the copies pairwise, level by level (a
    join copies both sides' caches, so k parts joined one after another would copy the growing batch k times)."""
    first = parts[0][0]
    if first.capabilities.gather:
        return first.gather(parts)
    copies = [session.fork(list(rows)) for session, rows in parts]
    while len(copies) > 1:
        paired = []
        for left, right in zip(copies[::2], copies[1::2]):
            left.join(right)
            paired.append(left)
        copies = paired + ([copies[-1]] if len(copies) % 2 else [])
    return copies[0]
