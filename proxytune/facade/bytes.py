"""Byte-level proxy-tuning in the facade: each role's source seen byte by byte, and scoring over bytes."""
from __future__ import annotations

import ctypes
import sys
from typing import Sequence

import torch

from ..backends.protocol import LogitSource
from ..engine.bytelevel import ByteSource, ByteVocab, token_bytes
from ..engine.roles import Roles
from ..engine.scoring import ScoreItem
from ..errors import ProxyTuneError


def byte_sources(sources: dict[str, LogitSource], tokenizers: dict, eos: dict[str, set[int]], prune: float
                 ) -> dict[str, ByteSource]:
    """Role -> the byte view of its source (one per distinct source and tokenizer, so roles sharing a model
    still share its sessions). A source that declares only a top-k distribution is refused up front."""
    partial = [(role, source) for role, source in sources.items() if source.distribution != "full"]
    if partial:
        role, source = partial[0]
        raise ProxyTuneError(f"byte-level proxy-tuning needs every role's whole next-token distribution, and the "
                             f"{role} model ({source.name}) is a server that returns only its top-k logprobs: run "
                             f"that role locally (a transformers model or a GGUF file), or use models that share "
                             f"one vocabulary")
    keep_heap_small()
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_LIMIT = 256 << 10


def keep_heap_small() -> None:
    """Reading bytes allocates and frees tensors of 0.1-2 MB at every byte (each path's KV rows, next-token
    distributions, logits) among long-lived ones. glibc raises its mmap threshold as such blocks are freed, so
    they come from the heap, which fragments: a 16-row GSM evaluation of the gemma trio grew to 23 GB of RSS
    for ~1 GB of live tensors and was killed. A fixed threshold (which also ends the dynamic adjustment)
    gives blocks above 256 KB back to the system when freed: measured here, 4 rows x 200 bytes grew 0.5 GB
    instead of 0.95 GB (the live tensors), for ~10-20 % more time. glibc only; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


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
