"""A remote base that drafts: one call per row continues it by several tokens of the server's own.

engine/chunked.py verifies the drafts against the local pair (`chunk=auto`, the default, for the base);
only positions whose distribution is exactly what a one-token call would return are handed over.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...errors import SourceFailure
from ..protocol import Capabilities, Draft
from .calls import Completions
from .http import RemoteSourceError
from .rows import RowReader
from .session import RemoteSession
from .wire import Wire


class Drafter:
    """One source's drafting calls: what the server continues with, and which of it is exact."""

    def __init__(self, completions: Completions, wire: Wire, reader: RowReader):
        self.completions, self.wire, self.reader = completions, wire, reader

    def continuation(self, ids: Sequence[int], width: int, vocab_size: int, temperature: float = 0.0,
                     seed: int = 0) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        """The server's own continuation of `ids`, up to `width` tokens, in one call: (drafted ids, the [V]
        distribution before each, q). Only exact positions are returned: a distribution after a drafted
        token comes only when that token is known exactly (an id key or a text one token owns) and the
        text a one-token call would send for it re-tokenises to what the server conditioned on (else a
        one-token step would see other tokens). The last draft may be -1 (no exact local id / no draft).

        Greedy drafts (the default, and for greedy rows): temperature 0 and hold_eos, the very settings
        of one-token calls, so each distribution is the one a one-token call returns; q is None (the
        draft is a point mass). With sample_drafts (token_ids=1) a sampling row's drafts are the server's
        own samples at `temperature` from its top-k, q [n, V] their distributions."""
        sampled = temperature > 0 and self.completions.options.sample_drafts
        prompt, conditioned = self.wire.encode(ids, read=True)
        choice = self.completions.complete(prompt, max_tokens=width, sampling=(temperature, seed) if sampled else None)
        keys = list(choice["logprobs"].get("tokens") or [])
        tops = list(choice["logprobs"].get("top_logprobs") or [])
        present = min(len(keys), len(tops), width)
        if present == 0 or not tops[0]:
            if sampled:  # the server stopped at once (it drew an end of sequence): draft greedily instead
                return self.continuation(ids, width, vocab_size)
            raise RemoteSourceError(f"{self.completions.name} model at {self.completions.options.base_url} drafted "
                                    f"no token with logprobs (finish_reason {choice.get('finish_reason')!r}; "
                                    f"hold_eos=1 keeps llama.cpp from stopping)")
        drafts, rows, qs = self.exact(ids, keys[:present], tops[:present], conditioned, vocab_size,
                                      temperature if sampled else None)
        self.reader.stats.add(drafted=present)
        # a position without q has no draft of its own (-1): its zeros are never read
        q = torch.stack([torch.zeros(vocab_size) if row_q is None else row_q for row_q in qs]) if sampled else None
        return drafts, rows, q

    def exact(self, ids: Sequence[int], keys: list, tops: list[dict], conditioned: list[int] | None,
              vocab_size: int, temperature: float | None) -> tuple[list[int], list[torch.Tensor], list]:
        """The leading drafted positions whose distribution a one-token call would return: (drafts, their
        rows, the q of each when the server sampled at `temperature`, else None)."""
        rows, drafts, qs = [], [], []
        for key, top in zip(keys, tops):
            if not top:
                break
            row = self.reader.row(top, vocab_size)
            q = self.reader.sampled_q(row, top, temperature) if temperature is not None else None
            exact = self.reader.strings.exact_id(key)
            mapped = exact if exact is not None else self.reader.strings.to_id(key, False)
            rows.append(row)
            qs.append(q)
            if temperature is not None and (q is None or exact is None or not torch.isfinite(row[exact])):
                drafts.append(-1)  # its distribution or identity unknown: the position is decided afresh
                break
            drafts.append(-1 if mapped is None else mapped)
            if exact is None or not self.wire.continues(ids, drafts, conditioned):
                break
        return drafts, rows, qs


class DraftingRemoteSession(RemoteSession):
    """A remote session that also drafts: one call per row continues it by several tokens of the server's own."""

    capabilities = Capabilities(rollback=True, join=True, fork=True, draft=True)

    @property
    def chunk(self) -> int | None:
        return self.source.options.chunk_limit  # chunk=N in the spec; None: auto

    def draft(self, tokens: torch.Tensor, widths: Sequence[int], temperatures: Sequence[float],
              seeds: Sequence[int]) -> Draft:
        fed_now = tokens.reshape(tokens.shape[0], -1).tolist()
        if len(fed_now) != len(self.rows) or len(widths) != len(self.rows):
            raise ValueError(f"draft got {len(fed_now)} rows and {len(widths)} widths for a session of {len(self.rows)}")
        self._append(fed_now)
        try:
            chunks = self.source.map_rows(lambda args: self.source.continuation(*args),
                                          list(zip(self.rows, widths, temperatures, seeds)))
        except SourceFailure:
            self._take_back(1)
            raise
        n, batch, vocab = max(widths), len(self.rows), self.source.vocab_size
        fed = torch.zeros(batch, n, dtype=torch.long)
        drafted = torch.full((batch, n), -1, dtype=torch.long)
        logits = torch.full((batch, n, vocab), float("-inf"))
        qs: list[torch.Tensor | None] = []
        for i, (drafts, rows, q) in enumerate(chunks):
            fed[i, 0] = fed_now[i][0]
            drafted[i, :len(drafts)] = torch.tensor(drafts, dtype=torch.long)
            fed[i, 1:len(drafts)] = drafted[i, :len(drafts) - 1].clamp_min(0)
            logits[i, :len(rows)] = torch.stack(rows)
            qs.append(None if q is None else torch.cat([q, torch.zeros(n - len(q), vocab)]))
        self._append(fed[:, 1:].tolist())
        self.appended, self.counted = n, 0
        return Draft(fed, drafted, logits, [len(rows) for _, rows, _ in chunks], qs)
