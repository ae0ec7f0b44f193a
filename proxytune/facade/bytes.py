"""Byte-level proxy-tuning in the facade: each role's source seen byte by byte, and scoring over bytes."""
from __future__ import annotations

from typing import Sequence

import torch

from ..backends.protocol import LogitSource
from ..engine.bytelevel import ByteSource, ByteVocab, token_bytes
from ..engine.roles import Roles
from ..engine.scoring import ScoreItem
from ..errors import ProxyTuneError


def byte_sources(sources: dict[str, LogitSource], tokenizers: dict, eos: dict[str, set[int]], prune: float,
                 remote: dict) -> dict[str, ByteSource]:
    """Role -> the byte view of its source (one per distinct source and tokenizer, so roles sharing a model
    still share its sessions)."""
    if remote:
        role, source = next(iter(remote.items()))
        raise ProxyTuneError(f"byte-level proxy-tuning needs every role's whole next-token distribution, and the "
                             f"{role} model ({source.name}) is a server that returns only its top-k logprobs: run "
                             f"that role locally (a transformers model or a GGUF file), or use models that share "
                             f"one vocabulary")
    tables: dict[int, list[bytes]] = {}
    vocabs: dict[tuple, ByteVocab] = {}  # sorting 262,144 byte strings once, not once per role
    views: dict[tuple, ByteSource] = {}
    out = {}
    for role, source in sources.items():
        tokenizer = tokenizers[role]
        if id(tokenizer) not in tables:
            tables[id(tokenizer)] = token_bytes(tokenizer, role)
        shape = (id(tokenizer), source.vocab_size, tuple(sorted(eos[role])))
        if shape not in vocabs:
            vocabs[shape] = ByteVocab(tables[id(tokenizer)], source.vocab_size, shape[2])
        key = (id(source), id(tokenizer))
        if key not in views:
            views[key] = ByteSource(source, vocabs[shape], name=role, prune=prune)
        out[role] = views[key]
    return out


def check_prompt_bytes(tokenizer, ids: Sequence[int], text: str, role: str, label: str) -> None:
    """A role whose tokenizer turned part of the prompt into an unknown token does not see the text the
    others see: refuse it, naming the role and the text."""
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ProxyTuneError(f"the {role} tokenizer cannot represent {label} {text[:60]!r}: it has no token (and no "
                             f"byte fallback) for some of its characters")


def byte_role_logits(roles: Roles, sources: dict[str, LogitSource], items: Sequence[ScoreItem],
                     only: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """Each role's byte logits [scored, 257] at the positions that predict each item's bytes."""
    results: list[dict[str, torch.Tensor]] = [{} for _ in items]
    computed: dict[tuple, torch.Tensor] = {}  # roles sharing a source and a prompt share the reading
    for role in only or roles:
        for result, item in zip(results, items):
            context = item.sequences[role][:len(item.sequences[role]) - item.scored]
            key = (id(sources[role]), tuple(context), tuple(item.targets()))
            if key not in computed:
                session = sources[role].open([context])
                first = session.prefill()
                rest = session.advance(torch.tensor([item.targets()[:-1]], dtype=torch.long))[0] \
                    if item.scored > 1 else first[:0]
                computed[key] = torch.cat([first, rest])
            result[role] = computed[key]
    return results
