"""The models an evaluation compares: base alone, expert alone, proxy-tuned (at some α), tuned anchor.

Every role decodes through the same engine (`Decoding`) so that batching, stopping and greedy
tie-breaking are identical; a model "alone" is a decoding whose base is that model and whose
expert pairs are that model against itself at α = 0 (its sessions are shared, so it runs once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..facade.compare import role_alone, solo_decoding
from ..engine.decoding import Decoding, Request
from ..errors import ProxyTuneError
from ..engine.scoring import proxy_logits, token_scores


@dataclass(frozen=True)
class Role:
    name: str  # how results are labelled: "base", "expert", "proxy", "proxy@0.5", "tuned"
    kind: str  # "base" | "expert" | "proxy" | "tuned"
    alpha: float | None = None  # proxy roles only
    schedule: tuple[tuple[int | str, float], ...] = ()  # proxy roles: (from output position or marker, α)

    @property
    def title(self) -> str:
        if self.kind == "proxy":
            changes = "".join(f", {a:g} after {p!r}" if isinstance(p, str) else f", {a:g} from token {p}"
                              for p, a in self.schedule)
            return f"proxy-tuned α={self.alpha:g}{changes}"
        return {"base": "base alone", "expert": "expert alone", "tuned": "tuned (anchor)"}[self.kind]


def eval_roles(alpha: float, with_tuned: bool, schedule: tuple = ()) -> list[Role]:
    roles = [Role("base", "base"), Role("expert", "expert"), Role("proxy", "proxy", alpha, tuple(schedule))]
    return roles + ([Role("tuned", "tuned")] if with_tuned else [])


def sweep_roles(alphas: Sequence[float], with_tuned: bool) -> list[Role]:
    """α = 0 is the base model by definition (z = z_base), so it is read from the base role, not re-run."""
    roles = [Role("base", "base"), Role("expert", "expert")]
    roles += [Role(f"proxy@{a:g}", "proxy", a) for a in alphas if a != 0]
    return roles + ([Role("tuned", "tuned")] if with_tuned else [])


class RoleRunner:
    """Builds requests and decodings (or scores) for each role over one loaded trio (+ optional tuned model)."""

    def __init__(self, tuner, tuned=None):
        if len(tuner.pairs) != 1:
            raise ProxyTuneError("evaluation compares one expert pair; this tuner has "
                                 f"{len(tuner.pairs)}")
        self.tuner = tuner
        self.tuned = tuned  # a ProxyTuner whose three roles are the tuned model (α = 0), or None
        # what the roles decode over ("new_tokens" then counts these); a tuned anchor decodes its own tokens
        self.level = "bytes" if tuner.byte_level else "tokens"

    def _tuner_of(self, role: Role):
        if role.kind == "tuned":
            if self.tuned is None:
                raise ProxyTuneError("the tuned role needs a tuned model (--tuned)")
            return self.tuned
        return self.tuner

    def request(self, role: Role, prompt: str, **options) -> Request:
        if role.kind == "proxy":
            schedule = dict(role.schedule) or None
            return self.tuner.request(prompt, alpha=role.alpha, alpha_schedule=schedule, **options)
        request = self._tuner_of(role).request(prompt, alpha=0.0, **options)
        return role_alone(request, role.kind) if role.kind in ("base", "expert") else request

    def decoding(self, role: Role, requests: Sequence[Request]) -> Decoding:
        if role.kind in ("base", "expert"):
            return solo_decoding(self.tuner, role.kind, list(requests))
        return self._tuner_of(role).decoding(requests)

    def score(self, roles: Sequence[Role], pairs: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        """Total log-probability of each continuation after its prompt, for every role.

        One full-sequence forward per model serves all roles: base alone and expert alone read their own
        logits, each proxy role combines them at its α (what `ProxyTuner.score_batch` computes)."""
        totals: dict[str, list[float]] = {}
        trio_roles = [r for r in roles if r.kind != "tuned"]
        if trio_roles:
            per_role = self._score_trio(trio_roles, pairs)
            totals.update(per_role)
        for role in roles:
            if role.kind == "tuned":
                totals[role.name] = [s.total for s in self._tuner_of(role).score_batch(list(pairs))]
        return totals

    def _score_trio(self, roles: Sequence[Role], pairs: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
        tuner = self.tuner
        items = [tuner.score_item(prompt, option, f"option {i}") for i, (prompt, option) in enumerate(pairs)]
        needed = tuner.roles if any(r.kind == "proxy" for r in roles) else sorted({r.kind for r in roles})
        totals: dict[str, list[float]] = {role.name: [] for role in roles}
        for item, logits in zip(items, tuner.role_logits(items, only=needed)):
            for role in roles:
                z = proxy_logits(tuner.schema, logits, [role.alpha]) if role.kind == "proxy" else logits[role.kind]
                totals[role.name].append(token_scores(z, item.targets()).total)
        return totals
