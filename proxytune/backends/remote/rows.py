"""A server's top-k logprobs read as logit rows over the local vocabulary, counted in the source's stats.

Each row holds the returned candidates and −inf elsewhere (token_strings.logit_row): the decoder then
adds α(z_expert − z_anti_expert) on exactly those candidates, as the paper does for GPT-3.5.
"""
from __future__ import annotations

import torch

from .http import RemoteSourceError
from .spec import RemoteOptions
from .stats import RemoteStats
from .token_strings import RowStats, TokenStrings, logit_row


class RowReader:
    """Logit rows from one source's answers (`name`: its role, in messages)."""

    def __init__(self, strings: TokenStrings, options: RemoteOptions, name: str, stats: RemoteStats):
        self.strings, self.options, self.name, self.stats = strings, options, name, stats

    def row(self, top: dict | None, vocab_size: int) -> torch.Tensor:
        """[vocab_size] from one top-logprobs entry (token key -> logprob). The width is the source's at the
        time (a tuner may cut it to the vocabulary its roles share)."""
        if not top:
            raise RemoteSourceError(f"{self.name} model at {self.options.base_url} returned no top-k logprobs "
                                    f"for a step (did it stop? hold_eos=1 keeps llama.cpp from stopping)")
        counted = RowStats()
        row = logit_row(top, self.strings, vocab_size, self.options.empty == "eos", counted, self.options.eos_rank)
        self.stats.add(distributions=1, candidates=counted.candidates, dropped=counted.dropped,
                       empty_as_eos=counted.empty_as_eos)
        if counted.candidates == 0:
            raise RemoteSourceError(f"none of the {self.name} model's top-{self.options.top_k} tokens "
                                    f"{list(top)[:5]} maps to a local token id")
        return row

    def sampled_q(self, row: torch.Tensor, top: dict, temperature: float) -> torch.Tensor | None:
        """The distribution the server sampled from: softmax(logprob / T) over its top-k — known when the
        entry holds all k (a server capping logprobs below top_k hides part of its support)."""
        finite = torch.isfinite(row)
        if len(top) < min(self.options.top_k, row.shape[-1]) or int(finite.sum()) < len(top):
            return None
        return torch.softmax(row / temperature, dim=-1)
