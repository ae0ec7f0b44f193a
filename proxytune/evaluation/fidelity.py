"""What a top-k base costs in fidelity: teacher-forced greedy agreement with a full-vocabulary run.

The reference tuner (e.g. every model local) decodes greedily; the candidate tuner (e.g. the same
base behind a server that returns only its top-k) is then fed the reference's tokens one by one,
and at each step we ask whether its own greedy choice would have been the same. Teacher forcing
keeps one early disagreement from turning every later step into a comparison of different texts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..engine.decoding import Request, open_session


NEAR_TIE = 0.1  # logit gap under which two evaluation paths of one model may order tokens differently


@dataclass
class Agreement:
    steps: int = 0
    agreed: int = 0
    covered: int = 0  # steps where the reference's token was among the candidate's finite base logits
    outside_top_k: int = 0  # disagreements where the reference's token was not a candidate at all
    near_ties: int = 0  # other disagreements where the reference itself had the two within NEAR_TIE
    disagreements: list[tuple[int, int, int, float]] = field(default_factory=list)  # step, ref, cand, ref gap

    @property
    def rate(self) -> float:
        return self.agreed / self.steps if self.steps else 1.0

    @property
    def others(self) -> int:
        return self.steps - self.agreed - self.outside_top_k - self.near_ties


def greedy_agreement(reference, candidate, requests: Sequence[Request]) -> Agreement:
    """Both tuners in lockstep along the reference's greedy path (up to each request's max_new_tokens
    or the reference's EOS); counts the steps where the candidate's argmax is the same token."""
    total = Agreement()
    for request in requests:
        sessions = [open_session(t.sources["base"], t.pairs, [request]) for t in (reference, candidate)]
        logits = [s.prefill() for s in sessions]
        for step in range(request.settings.max_new_tokens):
            ref_z, cand_z = logits[0].combined[0].float(), logits[1].combined[0].float()
            token, chosen = int(ref_z.argmax()), int(cand_z.argmax())
            ended = token in reference.eos_token_ids
            agreed = chosen == token or (ended and chosen in candidate.eos_token_ids)
            covered = bool(torch.isfinite(logits[1].base[0, token]))
            total.steps += 1
            total.agreed += agreed
            total.covered += covered
            if not agreed:
                gap = float(ref_z[token] - ref_z[chosen])
                total.outside_top_k += not covered
                total.near_ties += covered and gap < NEAR_TIE
                total.disagreements.append((step, token, chosen, gap))
            if ended:
                break
            tokens = torch.tensor([[token]], dtype=torch.long)
            logits = [s.advance(tokens).map(lambda z: z[:, -1]) for s in sessions]
    return total
