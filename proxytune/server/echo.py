"""Prompt log-probabilities for `echo` on /v1/completions (what lm-eval's `local-completions` scores).

The same arithmetic as `ProxyTuner.score`: one full-sequence forward per distinct model, then
log_softmax(z_base + α(z_expert − z_anti_expert)) at every position.
"""
from __future__ import annotations

import torch

from ..proxy import combined_logits
from .openai_format import TokenLogprob


def prompt_logprobs(tuner, prompts: list[dict[str, list[int]]], alphas: list[list[float]], top: int
                    ) -> list[list[TokenLogprob]]:
    """For each prompt (role -> token ids): the first token (no logprob), then log p̃ of each next one."""
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for role, source in tuner.sources.items():
        sequences = [p[role] for p in prompts]
        key = (id(source), tuple(map(tuple, sequences)))
        if key not in by_key:
            by_key[key] = source.sequence_logits(sequences)
    results = []
    for row, prompt in enumerate(prompts):
        logits = {role: by_key[(id(s), tuple(tuple(p[role]) for p in prompts))][row] for role, s in tuner.sources.items()}
        combined = combined_logits(logits["base"][None], [logits[r][None] for r in tuner.roles[1::2]],
                                   [logits[r][None] for r in tuner.roles[2::2]], torch.tensor([alphas[row]]))[0]
        logprobs = torch.log_softmax(combined.float()[:-1], dim=-1)  # position t predicts token t + 1
        ids = prompt["base"]
        targets = torch.tensor(ids[1:], dtype=torch.long)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist() if len(ids) > 1 else []
        tops = [[] for _ in chosen]
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
        results.append([TokenLogprob(ids[0], None, None)] +
                       [TokenLogprob(t, lp, tp) for t, lp, tp in zip(ids[1:], chosen, tops)])
    return results
