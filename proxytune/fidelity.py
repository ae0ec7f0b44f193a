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

from .decode import Request, last_position, open_session


@dataclass
class Agreement:
    steps: int = 0
    agreed: int = 0
    covered: int = 0  # steps where the reference's token was among the candidate's finite logits
    disagreements: list[tuple[int, int, int]] = field(default_factory=list)  # (step, reference, candidate)

    @property
    def rate(self) -> float:
        return self.agreed / self.steps if self.steps else 1.0

    def add(self, other: "Agreement") -> None:
        self.steps += other.steps
        self.agreed += other.agreed
        self.covered += other.covered
        self.disagreements += other.disagreements


def reference_path(tuner, request: Request) -> list[int]:
    """The reference's greedy tokens, ending with its EOS token when it stopped on one."""
    output = tuner.run([request])[0]
    path = list(output.token_ids)
    if output.finish_reason == "stop":
        path.append(min(tuner.eos_token_ids))
    return path


def greedy_agreement(reference, candidate, requests: Sequence[Request]) -> Agreement:
    total = Agreement()
    for request in requests:
        path = reference_path(reference, request)
        session = open_session(candidate.sources["base"], candidate.pairs, [request])
        logits = session.prefill()
        for step, token in enumerate(path):
            combined = logits.combined[0]
            chosen = int(combined.argmax())
            agreed = chosen == token or (token in reference.eos_token_ids and chosen in candidate.eos_token_ids)
            total.steps += 1
            total.agreed += agreed
            total.covered += bool(torch.isfinite(logits.base[0, token]))
            if not agreed:
                total.disagreements.append((step, token, chosen))
            if step + 1 < len(path):
                logits = last_position(session.advance(torch.tensor([[token]], dtype=torch.long)))
    return total
