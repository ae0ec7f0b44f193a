"""Exact speculative proxy decoding: the small expert drafts, the large base verifies.

Plain proxy decoding runs base, expert and anti-expert once per token. Here, per round:

1. the expert drafts k tokens x₁..x_k, one cheap step at a time, from its own distribution q;
2. base and anti-expert score [t, x₁..x_k] (t = the last chosen token) in ONE forward each, which
   gives the proxy distribution p̃ at all k+1 positions (the expert's logits come from drafting);
3. draft xⱼ is accepted with probability min(1, p̃(xⱼ)/q(xⱼ)); the first rejected one is replaced
   by a sample from norm(max(0, p̃ − q)). After x_k the expert's q is known too, so position k+1 is
   decided the same way with a draft that is never fed (it costs nothing more).
   Greedy: accept while argmax p̃ equals the draft, then take argmax p̃.

Leviathan et al. (2023) show this yields exact samples from p̃ whatever q is, so the output
distribution (and, for greedy, the output) is that of plain proxy decoding. p̃ and q are the
*warped* distributions (temperature, top-k/p, min-p), the ones tokens are really drawn from.

Every random draw is keyed by (row seed, output position, purpose), and every position is decided
by the same rule whether it falls inside a draft or at its end, so a seeded row's tokens depend
neither on k nor on its batch-mates: k may then follow measured costs (wall time is not
reproducible) without making seeded sampling irreproducible. A draw whose draft was discarded by an
earlier rejection influenced nothing that was kept, so using it again keeps the samples exact.

k comes from the acceptance rate and from what a round really costs on these backends: the time
of one drafting step and of verifying w tokens per row, measured per session (`StepTimes`).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .rows import Event, RowState, unsampleable
from .drafted import (DRAFT, DraftedDecoding, DraftLength, PositionRandomness, RowDrafts, linear_cost, verify_row,
                      refuse_schedules)
from .sampling import next_token_probs
from .session import StepTimes

__all__ = ["SpeculativeDecoding", "DraftLength", "PositionRandomness", "verify_row", "refuse_schedules"]


class SpeculativeDecoding(DraftedDecoding):
    """`Decoding` whose rounds draft with the expert and verify with the other roles; same events, same outputs.

    draft_length: a fixed k, or None to adapt k to the acceptance rate and the measured costs.
    """

    mode = "speculative"

    def _measure(self) -> None:
        """Feed the measured step times to the draft-length choice once every session has been timed."""
        times: StepTimes = self.times
        drafter = self.session.group(self.session.session_of["expert"])
        draft = times.widths(drafter).get(1)
        verifiers = [self.session.group(key) for key in self.session.sessions
                     if key != self.session.session_of["expert"]]
        measured = [times.widths(group) for group in verifiers]
        if draft is None or not all(measured):
            return
        costs = [linear_cost(widths, self.draft_length.verify_growth) for widths in measured]
        self.draft_length.measured(draft, lambda w: sum(cost(w) for cost in costs))

    def _draft(self, rows: list[RowState], expert_logits: torch.Tensor, j: int,
               randomness: list[PositionRandomness], earlier: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Draft j of every row from the expert's logits [B, V] (shaped like the row's own tokens, after the
        `earlier` drafts), and the warped q it came from."""
        tokens, q_probs = [], []
        broken = unsampleable(expert_logits).tolist()
        for position, row in enumerate(rows):
            params = row.request.settings.sampling
            z = expert_logits[position]
            if row.shaper is not None and not broken[position]:
                shaped = row.shaper.shape_after(z, row.tracker.token_ids, [int(d[position]) for d in earlier])
                # nothing allowed after an earlier draft (it ended the format, or the text): any q is exact
                z = z if shaped is None or bool(unsampleable(shaped[None])[0]) else shaped
            if broken[position]:
                tokens.append(0)  # nothing to draft from: verification finds the row unusable and ends it
                q_probs.append(None)
            elif params.greedy:
                tokens.append(int(z.argmax()))
                q_probs.append(None)
            else:
                q = next_token_probs(z, params).cpu()
                tokens.append(int(torch.multinomial(q, 1, generator=randomness[position](j, DRAFT))))
                q_probs.append(q)
        return torch.tensor(tokens, dtype=torch.long), q_probs

    def round(self, rows: list[RowState]) -> Iterator[list[Event]]:
        self._measure()
        k = min(self.draft_length.next(), self._cap(rows))
        randomness = [PositionRandomness(row.seed, len(row.tracker.token_ids)) for row in rows]
        last = torch.tensor([[row.tracker.token_ids[-1]] for row in rows], dtype=torch.long)
        drafter_key = self.session.session_of["expert"]
        expert_steps = [self.session.advance_session(drafter_key, last)]
        drafts, q_probs = [], []
        for j in range(k + 1):
            tokens, q = self._draft(rows, expert_steps[-1][:, -1], j, randomness, drafts)
            drafts.append(tokens)
            q_probs.append(q)
            if j < k:  # the last position's draft is only checked, never fed
                expert_steps.append(self.session.advance_session(drafter_key, tokens[:, None], extend=True))
        fed = torch.cat([last] + [d[:, None] for d in drafts[:k]], dim=1)  # [B, k+1]
        outputs = {drafter_key: torch.cat(expert_steps, dim=1), **self.session.advance_all(fed, but=drafter_key)}
        logits = self.session.collect(outputs)  # p̃ at all k+1 positions, [B, k+1, V]

        proposed = [RowDrafts(k + 1, [int(d[position]) for d in drafts],
                              lambda kept, position=position: [q[position] for q in q_probs][:len(kept)],
                              randomness[position]) for position in range(len(rows))]
        yield from self.verified(rows, logits, proposed, [k] * len(rows))
