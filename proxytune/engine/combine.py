"""The proxy-tuning arithmetic.

Liu et al. (2024), eq. 1:  z = z_base + Σ_i α_i · (z_expert_i − z_anti_expert_i),  p̃ = softmax(z).
Logits are combined, then normalised once (not per-model log-probs); sampling warpers act on z.
"""
from __future__ import annotations

from typing import Sequence

import torch


def combined_logits(base: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor],
                    alphas: torch.Tensor) -> torch.Tensor:
    """base/experts/anti_experts: [B, V] or [B, k, V]; alphas: [B, P] (one α per row and pair)."""
    z = base.clone()
    for pair, (expert, anti_expert) in enumerate(zip(experts, anti_experts)):
        # A token for which one small model of the pair gives no finite logit (−inf: it cannot write it, a
        # remote top-k left it out, the byte view pruned its last path) gets no shift: the pair offers no
        # difference there (and −inf − −inf would be NaN); the base's −inf still rules the token out. A NaN
        # a model produced stays NaN, so the decoder reports it instead of quietly dropping that model's say.
        shift = expert - anti_expert
        shift = torch.where(expert.isneginf() | anti_expert.isneginf(), torch.zeros_like(shift), shift)
        alpha = alphas[:, pair].to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
        z += torch.where(alpha == 0, torch.zeros_like(shift), alpha * shift)
    return z
