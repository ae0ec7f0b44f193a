"""Prompt log-probabilities for `echo` on /v1/completions (what lm-eval's `local-completions` scores).

The engine's scoring (`engine/scoring.py`), chunk by chunk: log_softmax(z_base + α(z_expert − z_anti_expert))
at every prompt position, CHUNK positions per `step()`. The scheduler calls `step()` between two decoding
steps, so a long prompt never stalls the other requests' streams, and memory holds one chunk's logits
(plus what the response needs: each position's log p̃ and its best alternatives).
"""
from __future__ import annotations

from ..engine import scoring
from ..engine.scoring import ScoreItem
from .openai_format import TokenLogprob

CHUNK = 128  # the most positions per step: 128 x vocabulary x 4 bytes per role (25 MB at 49k tokens)


class PromptScoring:
    """For each prompt (role -> token ids): its first tokens (no logprob), then log p̃ of each next one.

    Roles may tokenize a prompt to different lengths (one adds BOS): the tokens every role has a token
    before are scored."""

    def __init__(self, tuner, prompts: list[dict[str, list[int]]], alphas: list[list[float]], top: int):
        self.tuner, self.top = tuner, top
        self.results: list[list[TokenLogprob]] = []
        self.work = self._work(prompts, alphas)
        next(self.work)  # to its first `yield`: nothing is computed before the first step()

    def _work(self, prompts, alphas):
        yield  # from here on every step() sends the size of the chunk it wants next
        for prompt, prompt_alphas in zip(prompts, alphas):
            ids = prompt["base"]
            scored = min(len(p) for p in prompt.values()) - 1
            positions = [TokenLogprob(t, None, None) for t in ids[:len(ids) - max(scored, 0)]]
            if scored >= 1:
                parts = scoring.score_in_chunks(self.tuner.sources["base"], self.tuner.pairs, ScoreItem(prompt, scored),
                                                prompt_alphas, self.top, CHUNK)
                part = next(parts)  # the context's prefill: the first scored position
                while part is not None:
                    tops = part.top or [[] for _ in part.logprobs]
                    positions += [TokenLogprob(t, lp, tp) for t, lp, tp in zip(part.token_ids, part.logprobs, tops)]
                    size = yield len(part.token_ids)
                    part = next_part(parts, size)
            self.results.append(positions)

    def step(self, size: int = CHUNK) -> int | None:
        """Score the next chunk of at most `size` positions: how many were scored, or None once every prompt
        is scored (then read `results`)."""
        try:
            return self.work.send(min(size, CHUNK))
        except StopIteration:
            return None


def next_part(parts, size: int):
    """The next chunk of `size` positions from score_in_chunks, None when it is done."""
    try:
        return parts.send(size)
    except StopIteration:
        return None
