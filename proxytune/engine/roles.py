"""Roles as data: the base, then expert pairs (expert, anti-expert), each role with a display name.

Everything that needs "which role is which" asks a `Roles` object instead of reading meaning into a
name or a position: `roles.names` in order, `roles.pairs[i]` (expert name, anti-expert name), and
`roles.kind(name)` ("base" | "expert" | "anti_expert") for options that speak of kinds (`chat_roles`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Mapping, Sequence

from ..backends.protocol import LogitSource

@dataclass(frozen=True)
class Role:
    name: str  # "base", "expert", "anti_expert", "expert_2", "anti_expert_2", ...
    kind: str  # "base" | "expert" | "anti_expert"
    pair: int | None = None  # which expert pair (None for the base)

    @property
    def title(self) -> str:
        words = self.kind.replace("_", "-")
        return words if self.pair in (None, 0) else f"{words} {self.pair + 1}"


@dataclass(frozen=True)
class Roles:
    """The role schema of a proxy over `n_pairs` expert pairs: z = z_base + Σᵢ αᵢ (z_expertᵢ − z_antiᵢ)."""
    n_pairs: int

    def __post_init__(self):
        if self.n_pairs < 1:
            raise ValueError("a proxy needs at least one expert pair")

    @cached_property
    def all(self) -> tuple[Role, ...]:
        roles = [Role("base", "base")]
        for i in range(self.n_pairs):
            suffix = "" if i == 0 else f"_{i + 1}"
            roles += [Role(f"expert{suffix}", "expert", i), Role(f"anti_expert{suffix}", "anti_expert", i)]
        return tuple(roles)

    @cached_property
    def names(self) -> list[str]:
        return [role.name for role in self.all]

    @cached_property
    def pairs(self) -> list[tuple[str, str]]:
        """(expert name, anti-expert name) of each pair, in order."""
        expert = {role.pair: role.name for role in self.all if role.kind == "expert"}
        anti = {role.pair: role.name for role in self.all if role.kind == "anti_expert"}
        return [(expert[i], anti[i]) for i in range(self.n_pairs)]

    @property
    def experts(self) -> list[str]:
        return [expert for expert, _ in self.pairs]

    @property
    def anti_experts(self) -> list[str]:
        return [anti for _, anti in self.pairs]

    def role(self, name: str) -> Role:
        for role in self.all:
            if role.name == name:
                return role
        raise KeyError(f"no role {name!r} among {self.names}")

    def kind(self, name: str) -> str:
        return self.role(name).kind

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


@dataclass
class ExpertPair:
    """The models of one pair. Its α is a request's (Settings.alpha): the same pair serves every α."""
    expert: LogitSource
    anti_expert: LogitSource


def pairs_of(roles: Roles, sources: Mapping[str, LogitSource]) -> list[ExpertPair]:
    return [ExpertPair(sources[e], sources[a]) for e, a in roles.pairs]
