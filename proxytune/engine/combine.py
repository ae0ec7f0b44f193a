"""The proxy-tuning arithmetic.

Liu et al. (2024), eq. 1:  z = z_base + Σ_i α_i · (z_expert_i − z_anti_expert_i),  p̃ = softmax(z).
Logits are combined, then normalised once (not per-model log-probs); sampling warpers act on z.
"""
from __future__ import annotations

from typing import Sequence

import torch


def combined_logits(base: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor],
                    alphas: torch.Tensor, every_model_writes: bool = False) -> torch.Tensor:
    """base/experts/anti_experts: [B, V] or [B, k, V]; alphas: [B, P] (one α per row and pair).

    every_model_writes: what any model rules out (−inf) is ruled out. The byte view needs it: every role must
    be able to continue the text that is chosen, and its pruning may drop a byte's last path in one role only."""
    z = base.clone()
    ruled_out = torch.zeros_like(z, dtype=torch.bool) if every_model_writes else None
    for pair, (expert, anti_expert) in enumerate(zip(experts, anti_experts)):
        # A token both small models forbid (−inf − −inf) gets no shift rather than NaN; a NaN a model
        # produced stays NaN, so the decoder reports it instead of quietly dropping that model's say.
        shift = expert - anti_expert
        shift = torch.where(expert.isneginf() & anti_expert.isneginf(), torch.zeros_like(shift), shift)
        alpha = alphas[:, pair].to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        z += torch.where(alpha == 0, torch.zeros_like(shift), alpha * shift)
        if ruled_out is not None:
            ruled_out |= expert.isneginf() | anti_expert.isneginf()
    return z if ruled_out is None else z.masked_fill(ruled_out, float("-inf"))
