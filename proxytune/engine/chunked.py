"""Chunked decoding: the base drafts its own continuation, the local pair verifies it.

A base behind an API costs one call per token in plain decoding. Here a base whose session declares
`draft` (a remote base) continues every row by up to n tokens of its own in one call and returns the
distribution before each; the expert and anti-expert score the same n positions in one forward each.
The base's distribution at position j is exact (what a one-token call after the same tokens returns:
the session promises this for `Draft.usable` positions), so the proxy distribution p̃ is known at every
position, and per row:

* greedy: accept the base's tokens while argmax p̃ equals them; at the first difference take argmax p̃
  and start the next chunk there;
* sampling: speculative acceptance (Leviathan et al. 2023) with q = the distribution the draft was drawn
  from: the server's own sampling distribution (sample_drafts) or, for greedy drafts, a point mass on
  the drafted token (accept it with probability p̃(d), else sample p̃ without d). Either way every
  position is an exact draw from p̃, so the output distribution is that of plain decoding.

A position past the usable ones is decided in a later round from a fresh call, so nothing inexact is
ever used. Every position is decided by the rule `verify_row` applies in every drafted decoding (drafted.py), its
random draws keyed by (row seed, output position): greedy drafts make a seeded row's tokens independent
of n and of its batch-mates. n follows `DraftLength` with the measured cost of a round (the base's call
for n tokens plus the pair's forwards of n tokens).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .rows import Event, RowState
from .drafted import DraftedDecoding, DraftLength, PositionRandomness, RowDrafts, linear_cost

SEED_RANGE = 2 ** 31  # servers take 32-bit seeds (llama.cpp), some signed


def draft_distributions(given: torch.Tensor | None, tokens: list[int], vocab: int) -> list[torch.Tensor]:
    """q for each draft: the distribution the session says it drew the draft from, or, for its greedy
    drafts, a point mass on each (the base's deterministic choice after that prefix)."""
    if given is not None:
        return list(given[:len(tokens)])
    q = torch.zeros(len(tokens), vocab)
    q[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
    return list(q)


class ChunkedDecoding(DraftedDecoding):
    """`Decoding` whose rounds let the base draft up to n tokens per row in one call; same outputs as plain.

    draft_length: this many tokens per call (None: the base session's own `chunk`, else adaptive)."""

    mode = "chunked"

    def __init__(self, base, pairs, requests, tokenizer, eos_ids, draft_length: int | None = None, session=None):
        lengths = DraftLength(draft_cost=0.0, verify_growth=0.1, maximum=15)
        super().__init__(base, pairs, requests, tokenizer, eos_ids, draft_length, session, lengths)
        tokens = draft_length or self.session.base_session.chunk  # asked for, or the base's configured length
        if tokens:
            self.draft_length.fixed = tokens - 1  # k drafts beyond the first position

    def _measure(self) -> None:
        """A round costs the base's call for n tokens and the other sessions' forwards of n tokens."""
        measured = [self.times.widths(self.session.group(key)) for key in self.session.sessions]
        if not all(measured):
            return
        costs = [linear_cost(widths, self.draft_length.verify_growth) for widths in measured]
        self.draft_length.measured(0.0, lambda w: sum(cost(w) for cost in costs))

    def round(self, rows: list[RowState]) -> Iterator[list[Event]]:
        self._measure()
        n = 1 + min(self.draft_length.next(), self._cap(rows))
        widths = [max(1, min(n, row.budget - len(row.tracker.token_ids))) for row in rows]
        starts = [len(row.tracker.token_ids) for row in rows]
        seeds = [(row.seed * 1_000_003 + start) % SEED_RANGE for row, start in zip(rows, starts)]
        last = torch.tensor([[row.tracker.token_ids[-1]] for row in rows], dtype=torch.long)
        base_key = self.session.session_of["base"]
        draft = self.session.draft_session(base_key, last, widths,
                                           [row.request.settings.sampling.temperature for row in rows], seeds)
        outputs = {base_key: draft.logits, **self.session.advance_all(draft.fed, but=base_key)}
        logits = self.session.collect(outputs)  # p̃ at every drafted position, [B, n, V]

        vocab = logits.combined.shape[-1]
        proposed = []
        for position, (row, start) in enumerate(zip(rows, starts)):
            usable = draft.usable[position]
            drafts = draft.tokens[position, :usable].tolist()
            if drafts[-1] < 0:  # the last usable position has no draft of its own: decided afresh
                drafts = drafts[:-1]
            greedy, given = row.request.settings.sampling.greedy, draft.q[position]
            proposed.append(RowDrafts(usable, drafts, lambda kept, greedy=greedy, given=given:
                                      None if greedy else draft_distributions(given, kept, vocab),
                                      PositionRandomness(row.seed, start)))
        yield from self.verified(rows, logits, proposed, [usable - 1 for usable in draft.usable])
