"""The backends a role can run in, each registered here once (its module declares the rest: models/backend.py).

The loader (loading.py), the plan (plan.py) and the CLI's `--backend` and `--dry-run` ask this registry which
backend runs a spec and what it declares; none of them names a backend. docs/backends.md: adding one.
"""
from __future__ import annotations

from ..errors import ProxyTuneError
from . import gguf_roles, remote_roles, transformers_roles
from .backend import Backend

BACKENDS: list[Backend] = [
    transformers_roles.BACKEND,
    gguf_roles.BACKEND,
    remote_roles.BACKEND,
]


def register(backend: Backend) -> Backend:
    """A backend defined outside proxytune (a plugin, a test) joins the registered ones."""
    for known in BACKENDS:
        if backend.name == known.name or backend.prefix == known.prefix:
            raise ProxyTuneError(f"the backend {backend.name!r} (prefix {backend.prefix!r}) clashes with the "
                                 f"registered {known.name!r} (prefix {known.prefix!r})")
    BACKENDS.append(backend)
    return backend


def backend_of(spec: str) -> Backend:
    """The backend that runs a spec: the one whose prefix is the longest that the spec starts with."""
    return max((backend for backend in BACKENDS if backend.claims(spec)), key=lambda backend: len(backend.prefix))


def every_role_names() -> list[str]:
    """What `--backend NAME` accepts: the backends that can run every local role."""
    return [backend.name for backend in BACKENDS if backend.every_role]


def named(name: str) -> Backend:
    for backend in BACKENDS:
        if backend.every_role and name in (backend.name, *backend.aliases):
            return backend
    raise ProxyTuneError(f"unknown backend {name!r}; use one of {', '.join(every_role_names())}")


def with_backend(spec: str, name: str | None) -> str:
    """The spec a role runs under `--backend NAME` (None: as the spec itself says). A spec whose prefix already
    names its backend keeps it (a model behind a server stays there): --backend chooses how the others run."""
    if name is None:
        return spec
    backend = named(name)
    return spec if backend_of(spec).prefix else backend.prefix + spec
