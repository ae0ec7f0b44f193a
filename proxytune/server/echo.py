"""Prompt log-probabilities for `echo` on /v1/completions (what lm-eval's `local-completions` scores).

The engine's one scoring function (`engine/scoring.py`, as `ProxyTuner.score` uses it): one full-sequence forward per distinct
model, then log_softmax(z_base + α(z_expert − z_anti_expert)) at every position.
"""
from __future__ import annotations

from ..engine import scoring
from ..engine.scoring import ScoreItem
from .openai_format import TokenLogprob


def prompt_logprobs(tuner, prompts: list[dict[str, list[int]]], alphas: list[list[float]], top: int
                    ) -> list[list[TokenLogprob]]:
    """For each prompt (role -> token ids): its first tokens (no logprob), then log p̃ of each next one.

    Roles may tokenize a prompt to different lengths (one adds BOS): the tokens every role has a
    token before are scored."""
    results: list[list[TokenLogprob] | None] = [None] * len(prompts)
    scorable = []
    for row, prompt in enumerate(prompts):
        scored = min(len(ids) for ids in prompt.values()) - 1
        if scored < 1:
            results[row] = [TokenLogprob(t, None, None) for t in prompt["base"]]
        else:
            scorable.append((row, ScoreItem(prompt, scored)))
    if scorable:  # one scoring call for all prompts: one full-sequence forward per distinct model
        scores = scoring.score(tuner.schema, tuner.sources, [item for _, item in scorable],
                               [alphas[row] for row, _ in scorable], top=top)
        for (row, item), score in zip(scorable, scores):
            ids = item.sequences["base"]
            tops = score.top or [[] for _ in score.logprobs]
            results[row] = ([TokenLogprob(t, None, None) for t in ids[:len(ids) - item.scored]] +
                            [TokenLogprob(t, lp, tp) for t, lp, tp in zip(score.token_ids, score.logprobs, tops)])
    return results
