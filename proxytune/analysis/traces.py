"""Token-level traces of proxy-tuned generations: at each generated token, what every role thought.

A trace is plain data (saved as traces.jsonl): for each token its text piece and character span in the
output, the probability every role (base, expert, anti_expert, proxy) gave the chosen token, and each
role's top tokens. The analyses and the HTML page read only traces.
"""
from __future__ import annotations

from typing import Sequence

from ..decode import GenerationOutput


def pieces(tokenizer, token_ids: Sequence[int]) -> list[tuple[str, int, int]]:
    """(text piece, start, end) of each token in the decoded output. Decoding prefixes keeps characters
    that span several byte-level tokens whole: the piece goes to the token that completes them."""
    spans, previous = [], ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[:i + 1]), skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: nothing visible yet
            spans.append(("", len(previous), len(previous)))
            continue
        common = len(previous) if text.startswith(previous) else 0
        spans.append((text[common:], common, len(text)))
        previous = text
    return spans


def trace_of(tokenizer, prompt: str, output: GenerationOutput, label: str = "") -> dict:
    steps = output.details or []
    tokens = []
    for (piece, start, end), token_id, detail in zip(pieces(tokenizer, output.token_ids), output.token_ids, steps):
        tokens.append({
            "id": token_id, "piece": piece, "start": start, "end": end,
            "chosen": {role: round(p, 6) for role, p in detail.chosen_prob.items()},
            "top": {role: [[tokenizer.decode([i]), round(p, 6)] for i, p in top] for role, top in detail.top.items()},
            "top_id": {role: top[0][0] for role, top in detail.top.items()},
        })
    return {"label": label, "prompt": prompt, "text": output.text, "tokens": tokens}


def collect(tuner, prompts: Sequence[str], labels: Sequence[str] | None = None, max_new_tokens: int = 256,
            stop: Sequence[str] = (), top_k: int = 5, alpha=None, batch_size: int = 8) -> list[dict]:
    """Greedy proxy-tuned generations with every role's view of every token."""
    outputs = tuner.generate(list(prompts), max_new_tokens=max_new_tokens, stop=list(stop) or None, alpha=alpha,
                             return_details=top_k, batch_size=batch_size)
    labels = list(labels) if labels is not None else [f"prompt {i}" for i in range(len(prompts))]
    return [trace_of(tuner.tokenizer, p, o, label) for p, o, label in zip(prompts, outputs, labels)]
