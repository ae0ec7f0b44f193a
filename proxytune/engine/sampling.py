"""Choosing the next token from combined logits: greedy, or transformers' warpers + a seeded draw.

Every row has its own parameters and its own `torch.Generator`, so a row's samples do not depend
on which other rows share its batch (batched == one at a time, also when sampling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from ..errors import ProxyTuneError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ProxyTuneError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ProxyTuneError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ProxyTuneError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ProxyTuneError(f"min_p must be in [0, 1), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@lru_cache(maxsize=64)
def _warpers(params: SamplingParams) -> LogitsProcessorList:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(params.temperature))])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(params.top_p)))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(float(params.min_p)))
    return warpers


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: softmax of the warped logits ([..., V] -> [..., V]).
    Greedy gives a one-hot on the argmax."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if params.greedy:
        probs = torch.zeros_like(flat)
        probs.scatter_(1, flat.argmax(-1, keepdim=True), 1.0)
    else:
        dummy_ids = torch.zeros((flat.shape[0], 1), dtype=torch.long, device=flat.device)
        probs = torch.softmax(_warpers(params)(dummy_ids, flat.clone()), dim=-1)
    return probs.reshape(logits.shape)


def random_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else random_seed())
    return generator


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token for one row from its combined logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    probs = next_token_probs(logits, params).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
