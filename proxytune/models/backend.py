"""What a backend declares to the registry (backend_registry.py): the specs it runs, how it loads them, what
`--dry-run` says about them, and its properties, so that the loader, the plan and the CLI never name a backend.

A backend's module (transformers_roles.py, gguf_roles.py, remote_roles.py) defines one `BACKEND = Backend(...)`
and keeps its concrete imports (llama_cpp, httpx) inside the functions that need them: the registry imports
every backend's module, and a user who never runs a role there must not need its packages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from .placement import Placement


@dataclass(frozen=True)
class LoadOptions:
    """What a loading asks of every backend beyond a role's placement; each backend reads what applies to it."""
    threads: int | None = None  # llama.cpp threads per model
    n_ctx: int | None = None  # llama.cpp KV cells per model
    trust_remote_code: bool = False  # transformers: let checkpoints run their own modelling code


class RoleLoader(Protocol):
    """One loading's state in one backend (what its roles share: weights, a llama.cpp model, a connection)."""

    def source(self, spec: str, role: str, placement: Placement) -> tuple[object, object]:
        """(logit source, tokenizer) for one role's spec, already claimed by this backend."""


@dataclass
class RolePlan:
    """What loading one role would take (`--dry-run`, plan.table); nothing is loaded to know it."""
    role: str
    spec: str  # as given, before --backend put a prefix before it
    runs_in: str  # "transformers" | "llama.cpp" | "server" | another backend's word for where it runs
    where: str  # a device, a device map, the server's address
    dtype: str
    weights: int | None  # bytes this role adds (0 when it shares another role's weights; None: unknown)
    kv_per_token: int | None  # bytes of KV cache per token per row
    note: str = ""


# (role, spec as given, spec as run, placement, keys of the weights earlier roles counted: add yours) -> its plan
Planner = Callable[[str, str, str, Placement, set], RolePlan]


def never(_) -> bool:
    return False


@dataclass(frozen=True)
class Backend:
    """One way to run a role. The registry picks, for a spec, the backend with the longest matching prefix."""
    name: str  # what `--backend NAME` says, and errors
    prefix: str  # specs starting with it run here ("gguf:", "openai:"); "": every spec no other prefix claims
    loader: Callable[[LoadOptions], RoleLoader]  # a new loading's state here, made when its first spec appears
    plan: Planner
    every_role: bool = False  # `--backend NAME` runs here every role whose spec has no prefix, by putting `prefix`
    #                           before it
    aliases: tuple[str, ...] = ()  # other spellings `backend=` accepts ("llama-cpp")
    loads_first: Callable[[str], bool] = never  # specs loaded before all others (a peft adapter: its base is shared)
    extra: str | None = None  # pip extra holding what it imports: pip install 'proxytune[EXTRA]' when one is missing

    def claims(self, spec: str) -> bool:
        return spec.startswith(self.prefix)
