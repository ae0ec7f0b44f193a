"""Roles as data: the base, then expert pairs (expert, anti-expert, α), each role with a display name.

Everything that needs "which role is which" asks a `Roles` object instead of reading meaning into a
name or a position: `roles.names` in order, `roles.pairs[i]` (expert name, anti-expert name), and
`roles.kind(name)` ("base" | "expert" | "anti_expert") for options that speak of kinds (`chat_roles`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterator, Mapping, Sequence, TypeVar

from ..backends.protocol import LogitSource

KINDS = ("base", "expert", "anti_expert")
T = TypeVar("T")


@dataclass(frozen=True)
class Role:
    name: str  # "base", "expert", "anti_expert", "expert_2", "anti_expert_2", ...
    kind: str  # one of KINDS
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

    @property
    def all(self) -> tuple[Role, ...]:
        roles = [Role("base", "base")]
        for i in range(self.n_pairs):
            suffix = "" if i == 0 else f"_{i + 1}"
            roles += [Role(f"expert{suffix}", "expert", i), Role(f"anti_expert{suffix}", "anti_expert", i)]
        return tuple(roles)

    @property
    def names(self) -> list[str]:
        return [role.name for role in self.all]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(expert name, anti-expert name) of each pair, in order."""
        return [(f"expert{s}", f"anti_expert{s}") for s in ("" if i == 0 else f"_{i + 1}" for i in range(self.n_pairs))]

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

    def __len__(self) -> int:
        return 1 + 2 * self.n_pairs


@dataclass
class ExpertPair:
    expert: LogitSource
    anti_expert: LogitSource
    alpha: float = 1.0


@dataclass
class ByRole(Generic[T]):
    """One value per role of a schema (sources, tokenizers, prompts, logits)."""
    roles: Roles
    values: dict[str, T]

    def __getitem__(self, name: str) -> T:
        return self.values[name]

    @property
    def base(self) -> T:
        return self.values["base"]

    @property
    def experts(self) -> list[T]:
        return [self.values[name] for name in self.roles.experts]

    @property
    def anti_experts(self) -> list[T]:
        return [self.values[name] for name in self.roles.anti_experts]


def pairs_of(roles: Roles, sources: Mapping[str, LogitSource], alphas: Sequence[float]) -> list[ExpertPair]:
    return [ExpertPair(sources[e], sources[a], float(alpha)) for (e, a), alpha in zip(roles.pairs, alphas)]
