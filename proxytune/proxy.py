"""The proxy-tuning arithmetic and one decoding step over all roles.

Liu et al. (2024), eq. 1:  z = z_base + Σ_i α_i · (z_expert_i − z_anti_expert_i),  p̃ = softmax(z).
Logits are combined, then normalised once (not per-model log-probs); sampling warpers act on z.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from .sources.protocol import LogitSource, Session


def combined_logits(base: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor],
                    alphas: torch.Tensor) -> torch.Tensor:
    """base/experts/anti_experts: [B, V] or [B, k, V]; alphas: [B, P] (one α per row and pair)."""
    z = base.clone()
    for pair, (expert, anti_expert) in enumerate(zip(experts, anti_experts)):
        # A token both small models forbid (−inf − −inf) gets no shift rather than NaN.
        shift = torch.nan_to_num(expert - anti_expert, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        alpha = alphas[:, pair].to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        z += torch.where(alpha == 0, torch.zeros_like(shift), alpha * shift)
    return z


@dataclass
class ExpertPair:
    expert: LogitSource
    anti_expert: LogitSource
    alpha: float = 1.0


def role_names(n_pairs: int) -> list[str]:
    """base, expert, anti_expert, then expert_2, anti_expert_2, ... for further pairs."""
    names = ["base"]
    for i in range(n_pairs):
        suffix = "" if i == 0 else f"_{i + 1}"
        names += [f"expert{suffix}", f"anti_expert{suffix}"]
    return names


@dataclass
class RoleLogits:
    base: torch.Tensor
    experts: list[torch.Tensor]
    anti_experts: list[torch.Tensor]
    combined: torch.Tensor

    def by_role(self) -> dict[str, torch.Tensor]:
        named = {"base": self.base}
        for i, (e, a) in enumerate(zip(self.experts, self.anti_experts)):
            suffix = "" if i == 0 else f"_{i + 1}"
            named[f"expert{suffix}"], named[f"anti_expert{suffix}"] = e, a
        return named


class ProxySession:
    """The sessions of every role over one batch. A source given the same prompts for two roles
    (expert == anti-expert, or the same model as base) is run once and its logits shared."""

    def __init__(self, base: LogitSource, pairs: Sequence[ExpertPair], prompts: dict[str, list[list[int]]],
                 alphas: torch.Tensor):
        self.n_pairs = len(pairs)
        self.alphas = alphas
        self.sources = {"base": base}
        for name, pair in zip(role_names(len(pairs))[1::2], pairs):
            self.sources[name] = pair.expert
            self.sources["anti_" + name] = pair.anti_expert
        self.sessions: dict[tuple, Session] = {}
        self.session_of: dict[str, tuple] = {}
        for role, source in self.sources.items():
            key = (id(source), tuple(map(tuple, prompts[role])))
            if key not in self.sessions:
                self.sessions[key] = source.open(prompts[role])
            self.session_of[role] = key

    def _collect(self, outputs: dict[tuple, torch.Tensor]) -> RoleLogits:
        names = role_names(self.n_pairs)
        logits = {role: outputs[self.session_of[role]] for role in names}
        base = logits["base"]
        device = base.device
        experts = [logits[n].to(device) for n in names[1::2]]
        antis = [logits[n].to(device) for n in names[2::2]]
        return RoleLogits(base, experts, antis, combined_logits(base, experts, antis, self.alphas.to(device)))

    def prefill(self) -> RoleLogits:
        return self._collect({key: s.prefill() for key, s in self.sessions.items()})

    def advance(self, tokens: torch.Tensor) -> RoleLogits:
        return self._collect({key: s.advance(tokens) for key, s in self.sessions.items()})

    def rewind(self, keep: Sequence[int]) -> None:
        for session in self.sessions.values():
            session.rewind(keep)

    def select(self, rows: Sequence[int]) -> None:
        for session in self.sessions.values():
            session.select(rows)
        self.alphas = self.alphas[list(rows)]

    def join(self, other: "ProxySession") -> None:
        """Append the rows of `other` (prefilled, same sources) to this batch: dynamic batching.

        Roles share a session only while they share the source and the tokens of every row; a
        session shared on one side but not on the other is forked so that each role keeps its own.
        """
        groups: dict[tuple, list[str]] = {}
        for role, mine in self.session_of.items():
            groups.setdefault((mine, other.session_of[role]), []).append(role)
        uses_mine = Counter(mine for mine, _ in groups)
        uses_theirs = Counter(theirs for _, theirs in groups)
        sessions: dict[tuple, Session] = {}
        session_of: dict[str, tuple] = {}
        for (mine, theirs), roles in groups.items():
            left, right = self.sessions[mine], other.sessions[theirs]
            uses_mine[mine] -= 1
            uses_theirs[theirs] -= 1
            if uses_mine[mine]:  # the last user takes the original, the others a copy
                left = left.fork()
            if uses_theirs[theirs]:
                right = right.fork()
            left.join(right)
            sessions[(mine, theirs)] = left
            session_of.update({role: (mine, theirs) for role in roles})
        self.sessions, self.session_of = sessions, session_of
        self.alphas = torch.cat([self.alphas, other.alphas.to(self.alphas.device)])
