"""Scoring: log p̃ of given tokens under the combined distribution, from one full-sequence forward per model.

The one place where sequences are scored: `ProxyTuner.score`/`score_batch`, the server's `echo`, the
lm-eval adapter, the evaluations' multiple-choice tasks and the analysis traces all come here.

An item gives every role its own token sequence (each role tokenizes with its own tokenizer, exactly as
`generate` does) and says how many final tokens are scored; those must be the same ids in every role.
`role_logits` runs one `sequence_logits` per distinct source and token sequences (roles sharing both share
the forward) and keeps only the rows that predict scored tokens; `score` combines them,
z = z_base + Σᵢ αᵢ (z_expertᵢ − z_antiᵢ), and reads log_softmax(z) at each scored token.

`score_in_chunks` gives the same numbers for one long item with bounded memory: the roles' sessions
prefill the context and then advance `chunk` scored tokens at a time, so only one chunk's logits exist at
once (the server's `echo`, which must also let other requests' decoding steps run in between).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..backends.protocol import LogitSource
from ..errors import ProxyTuneError
from .roles import ExpertPair, Roles
from .session import ProxySession, combine, role_sources


@dataclass
class ScoreItem:
    sequences: dict[str, list[int]]  # role -> the whole token sequence that role sees
    scored: int  # how many final tokens are scored (the same ids in every role)

    def targets(self, role: str = "base") -> list[int]:
        return self.sequences[role][len(self.sequences[role]) - self.scored:]


@dataclass
class Score:
    token_ids: list[int]  # the scored tokens
    logprobs: list[float]  # log p̃ of each given everything before it
    is_greedy: bool  # every scored token was the argmax
    top: list[list[tuple[int, float]]] | None = None  # per position, the best (token, log p̃), when asked

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


def check_items(roles: Roles, items: Sequence[ScoreItem], limits: dict[str, int | None]) -> None:
    for i, item in enumerate(items):
        if item.scored < 1:
            raise ProxyTuneError(f"item {i} scores no token")
        targets = {role: item.targets(role) for role in roles}
        for role, sequence in item.sequences.items():
            if len(sequence) < item.scored + 1:
                raise ProxyTuneError(f"item {i} gives the {role} model {len(sequence)} tokens to score {item.scored}: "
                                     f"every scored token needs a token before it")
            if limits.get(role) and len(sequence) > limits[role]:
                raise ProxyTuneError(f"item {i} has {len(sequence)} tokens for the {role} model, whose context holds "
                                     f"{limits[role]}; shorten it")
        if len({tuple(t) for t in targets.values()}) > 1:
            raise ProxyTuneError(f"item {i}: the roles' tokenizers split the scored text differently "
                                 f"({ {r: t[:6] for r, t in targets.items()} }); score token ids instead")


def role_logits(roles: Roles, sources: dict[str, LogitSource], items: Sequence[ScoreItem],
                only: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """For each item, each role's logits [scored, V] at the positions that predict its scored tokens
    (`only`: just these roles, e.g. the base alone, so the other models are not run)."""
    check_items(roles, items, {role: source.max_length for role, source in sources.items()})
    computed: dict[tuple, list[torch.Tensor]] = {}
    results: list[dict[str, torch.Tensor]] = [{} for _ in items]
    for role in only or roles:
        sequences = [item.sequences[role] for item in items]
        key = (id(sources[role]), tuple(map(tuple, sequences)))
        if key not in computed:
            full = sources[role].sequence_logits(sequences)
            # row t predicts token t + 1: keep the rows before each scored token, drop the rest at once
            computed[key] = [f[len(s) - item.scored - 1:len(s) - 1] for f, s, item in zip(full, sequences, items)]
        for result, logits in zip(results, computed[key]):
            result[role] = logits
    return results


def token_scores(z: torch.Tensor, targets: Sequence[int], top: int = 0) -> Score:
    """Score of `targets` under softmax(z), z: [n, V] (row t predicts targets[t])."""
    logprobs = torch.log_softmax(z.float(), dim=-1)
    ids = torch.tensor(list(targets), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    best = None
    if top:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        best = [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return Score(list(targets), chosen.tolist(), bool((logprobs.argmax(-1) == ids).all()), best)


def proxy_logits(roles: Roles, logits: dict[str, torch.Tensor], alphas: Sequence[float]) -> torch.Tensor:
    """z [n, V] of one item at the given α per pair."""
    batched = {role: z[None] for role, z in logits.items()}
    return combine(roles, batched, torch.tensor([list(alphas)], dtype=torch.float32)).combined[0]


def score(roles: Roles, sources: dict[str, LogitSource], items: Sequence[ScoreItem],
          alphas: Sequence[Sequence[float]], top: int = 0, logits: Sequence[dict] | None = None) -> list[Score]:
    """log p̃ of each item's scored tokens, item i at alphas[i] (one α per pair). `logits`: each role's
    logits per item when they were read another way (the byte-level view reads them through sessions)."""
    per_item = role_logits(roles, sources, items) if logits is None else logits
    return [token_scores(proxy_logits(roles, item_logits, item_alphas), item.targets(), top)
            for item, item_logits, item_alphas in zip(items, per_item, alphas)]


def score_in_chunks(base: LogitSource, pairs: Sequence[ExpertPair], item: ScoreItem, alphas: Sequence[float],
                    top: int = 0, chunk: int = 128) -> Iterator[Score]:
    """log p̃ of one item's scored tokens, one Score per `chunk` positions (concatenated, they are the
    item's Score; equal to `score` up to float rounding: cached == recomputed). `send(n)` instead of
    `next()` sets the next chunk's size (a caller sharing the models with decoding keeps chunks short)."""
    sources = role_sources(base, pairs)
    check_items(Roles(len(pairs)), [item], {role: source.max_length for role, source in sources.items()})
    contexts = {role: [ids[:len(ids) - item.scored]] for role, ids in item.sequences.items()}
    session = ProxySession(base, pairs, contexts, torch.tensor([list(alphas)], dtype=torch.float32))
    targets = item.targets()
    logits = session.prefill().combined[:, None]  # [1, 1, V]: predicts targets[0]
    done = 0
    while True:
        size = (yield token_scores(logits[0], targets[done:done + logits.shape[1]], top)) or chunk
        done += logits.shape[1]
        if done == len(targets):
            return
        fed = torch.tensor([targets[done - 1:done - 1 + max(1, size)][:len(targets) - done]], dtype=torch.long)
        logits = session.advance(fed).combined
        session.settle()
