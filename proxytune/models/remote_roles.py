"""The remote backend: `openai:URL?tokenizer=...` specs, a model behind an OpenAI-compatible server
(backends/remote/spec.py says what the spec holds). httpx is imported only when such a role loads."""
from __future__ import annotations

from ..backends.remote.spec import PREFIX, parse_spec
from .backend import Backend, LoadOptions, RolePlan
from .placement import Placement
from .tokenizers import load_tokenizer



class RemoteRoles:
    """Nothing is shared between remote roles: each spec is its own connection and tokenizer."""

    def source(self, spec: str, role: str, placement: Placement):
        from ..backends.remote.source import RemoteSource

        options = parse_spec(spec)
        source = RemoteSource(options, load_tokenizer(options.tokenizer), name=role)
        return source, source.tokenizer


def plan(role: str, raw_spec: str, spec: str, placement: Placement, counted: set) -> RolePlan:
    return RolePlan(role, raw_spec, "server", spec.split("?")[0][len(PREFIX):], "-", 0, None)


def _loader(options: LoadOptions) -> RemoteRoles:
    return RemoteRoles()


BACKEND = Backend("remote", prefix=PREFIX, loader=_loader, plan=plan, extra="remote")
