"""Room in the models' contexts: the one computation behind the decoding's token budget, the cap on a draft,
and the prompt and max_tokens checks of every edge (the facade, the server, lm-eval).

Each role reads its own prompt (roles may be formatted or tokenized differently); a source whose context
length is unknown (`max_length` None) sets no bound.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..backends.protocol import LogitSource
from ..errors import ProxyTuneError


def context_length(sources: Mapping[str, LogitSource]) -> int | None:
    """The shortest context of the roles, or None when no role knows its own."""
    limits = [source.max_length for source in sources.values() if source.max_length]
    return min(limits) if limits else None


def rooms(prompts: Mapping[str, Sequence[int]], sources: Mapping[str, LogitSource]) -> dict[str, int]:
    """Role -> tokens that still fit after its prompt (roles with a known context length only)."""
    return {role: source.max_length - len(prompts[role]) for role, source in sources.items() if source.max_length}


def room_left(prompts: Mapping[str, Sequence[int]], sources: Mapping[str, LogitSource]) -> float:
    """Tokens that fit in every role's context after its prompt (inf when no role knows its length)."""
    return min(rooms(prompts, sources).values(), default=math.inf)


def check_prompt_room(prompts: Mapping[str, Sequence[int]], sources: Mapping[str, LogitSource],
                      label: str = "prompt") -> None:
    """Refuse prompts that leave a role no room for a single new token."""
    for role, room in rooms(prompts, sources).items():
        if room <= 0:
            raise ProxyTuneError(f"{label} has {len(prompts[role])} tokens for the {role} model, whose context holds "
                                 f"{sources[role].max_length}; shorten it to leave room for new tokens")


def overflow(prompts: Mapping[str, Sequence[int]], sources: Mapping[str, LogitSource], new_tokens: int
             ) -> tuple[str, int, int] | None:
    """The first role whose context cannot hold its prompt and `new_tokens` more: (role, prompt length, context
    length); None when every role's can."""
    for role, room in rooms(prompts, sources).items():
        if new_tokens > room:
            return role, len(prompts[role]), sources[role].max_length
    return None
