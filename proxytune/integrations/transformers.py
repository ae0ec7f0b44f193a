"""Proxy-tuning inside a transformers pipeline: a `LogitsProcessor` for the base model's own `generate()`.

    from proxytune.integrations.transformers import ProxyTuningLogitsProcessor

    processor = ProxyTuningLogitsProcessor(expert, anti_expert, alpha=1.0, pad_token_id=tokenizer.pad_token_id)
    base.generate(**inputs, logits_processor=[processor], max_new_tokens=64)

At every step transformers hands the processor the base's next-token logits and the ids so far; the
processor feeds the expert and anti-expert only the new tokens (their own KV caches, kept across steps, never
the whole prefix again) and returns z_base + α (z_expert − z_anti_expert) (engine/combine.py). Greedy decoding
with it gives exactly `ProxyTuner.generate`'s tokens (tested). Sampling settings of `generate()` (temperature,
top-p, ...) act on the combined logits when the processor comes first, as transformers applies processors in
list order; put no other processor before it.

The expert and anti-expert must share the base's vocabulary (ids beyond the shortest vocabulary, padded
embedding rows, are given no probability). Left-padded batches are supported: give `pad_token_id`, and the
processor skips each row's leading padding. One processor serves one `generate()` call; `reset()` (or a new
processor) before the next.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..backends.transformers import TransformersSource
from ..engine.combine import combined_logits
from ..errors import ProxyTuneError


def proxy_generate(base, expert, anti_expert, tokenizer, prompts, alpha: float = 1.0, **generate_options) -> list[str]:
    """The thin helper: `base.generate()` with the processor, over a batch of prompt strings (left-padded),
    returning the generated texts. `generate_options` go to transformers (max_new_tokens, do_sample, ...)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ProxyTuneError(f"prompts must be a string or a list of strings, got {prompts!r}")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(base.device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id
    processor = ProxyTuningLogitsProcessor(expert, anti_expert, alpha=alpha, pad_token_id=pad)
    out = base.generate(**inputs, logits_processor=[processor], pad_token_id=pad, **generate_options)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class ProxyTuningLogitsProcessor(LogitsProcessor):
    def __init__(self, expert, anti_expert, alpha: float = 1.0, pad_token_id: int | None = None):
        from ..engine.settings import check_alpha

        self.alpha = check_alpha(alpha)
        self.expert = expert if isinstance(expert, TransformersSource) else TransformersSource(expert, name="expert")
        self.anti_expert = anti_expert if isinstance(anti_expert, TransformersSource) else \
            TransformersSource(anti_expert, name="anti_expert")
        self.pad_token_id = pad_token_id
        self.reset()

    def reset(self) -> None:
        """Forget the rows of the last `generate()` call."""
        self.sessions = None
        self.seen = 0  # columns of input_ids the small models have read

    def _prompts(self, input_ids: torch.Tensor) -> list[list[int]]:
        rows = input_ids.tolist()
        if self.pad_token_id is None:
            return rows
        stripped = []
        for row in rows:
            start = next((i for i, t in enumerate(row) if t != self.pad_token_id), len(row))
            stripped.append(row[start:] or row[-1:])
        return stripped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.sessions is None or input_ids.shape[1] <= self.seen or input_ids.shape[0] != self.rows:
            prompts = self._prompts(input_ids)
            self.sessions = [source.open(prompts) for source in (self.expert, self.anti_expert)]
            small = [session.prefill() for session in self.sessions]
            self.rows = input_ids.shape[0]
        else:
            new = input_ids[:, self.seen:].cpu()
            small = [session.advance(new)[:, -1] for session in self.sessions]
        self.seen = input_ids.shape[1]
        width = min(scores.shape[-1], *(z.shape[-1] for z in small))  # padded embedding rows cut
        alphas = torch.full((scores.shape[0], 1), self.alpha, device=scores.device)
        combined = combined_logits(scores[:, :width].float(), [small[0][:, :width].to(scores.device)],
                                   [small[1][:, :width].to(scores.device)], alphas)
        out = torch.full_like(scores, float("-inf"))
        out[:, :width] = combined.to(scores.dtype)
        return out
