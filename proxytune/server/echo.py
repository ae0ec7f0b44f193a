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
        self.started = False

    def _work(self, prompts, alphas):
        for prompt, prompt_alphas in zip(prompts, alphas):
            ids = prompt["base"]
            scored = min(len(p) for p in prompt.values()) - 1
            positions = [TokenLogprob(t, None, None) for t in ids[:len(ids) - max(scored, 0)]]
            if scored >= 1:
                item = ScoreItem(prompt, scored)
                parts = scoring.score_in_chunks(self.tuner.sources["base"], self.tuner.pairs, item, prompt_alphas,
                                                self.top, CHUNK)
                size = None
                while True:
                    try:
                        part = parts.send(size) if size else next(parts)
                    except StopIteration:
                        break
                    tops = part.top or [[] for _ in part.logprobs]
                    positions += [TokenLogprob(t, lp, tp) for t, lp, tp in zip(part.token_ids, part.logprobs, tops)]
                    size = yield len(part.token_ids)
            self.results.append(positions)

    def step(self, size: int = CHUNK) -> int | None:
        """Score the next chunk of at most `size` positions: how many were scored, or None once every prompt
        is scored (then read `results`)."""
        try:
            return self.work.send(min(size, CHUNK)) if self.started else next(self.work)
        except StopIteration:
            return None
        finally:
            self.started = True
